//! Knobs of the benchmark programs, read from the environment.

/// The comma-separated numbers in `var` (e.g. `PARLEY_BENCH_CONCURRENCY=1,32,256`),
/// or `default` when it is unset.
///
/// # Panics
/// When an entry is not a number: a benchmark must not silently run
/// something other than what was asked.
pub fn numbers(var: &str, default: &[usize]) -> Vec<usize> {
    match std::env::var(var) {
        Ok(list) => list
            .split(',')
            .map(|entry| {
                entry
                    .trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("{var}: {entry:?} is not a number"))
            })
            .collect(),
        Err(_) => default.to_vec(),
    }
}

/// The service binary to benchmark: `PARLEY_BENCH_SERVICE` when set (another
/// build, for an A/B in one sitting), else `built` (the bench's own build).
pub fn service_binary(built: &str) -> String {
    std::env::var("PARLEY_BENCH_SERVICE").unwrap_or_else(|_| built.to_owned())
}

/// Whether the store `name` is selected by `PARLEY_BENCH_STORES` (a
/// comma-separated list, e.g. `embedded`); every store is when it is unset.
pub fn store_selected(name: &str) -> bool {
    std::env::var("PARLEY_BENCH_STORES").map_or(true, |stores| {
        stores.split(',').any(|store| store.trim() == name)
    })
}

/// Waits until the service at `base` answers `/ready` with a success.
///
/// # Panics
/// When it does not within 30 s: the benchmark cannot run without it.
pub async fn wait_until_ready(base: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while reqwest::get(format!("{base}/ready"))
        .await
        .map_or(true, |response| !response.status().is_success())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the server at {base} did not start"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
