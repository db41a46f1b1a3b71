//! Compiles the committed web build (`web/dist`, written by `npm run build`
//! in `web/`) into the binary, so that serving the pages needs no Node.js:
//! writes `$OUT_DIR/web_assets.rs`, a table of every file under `web/dist`
//! as (URL path, bytes).

use std::error::Error;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn main() -> Result<(), Box<dyn Error>> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let dist = manifest_dir.join("../web/dist");
    // A directory: cargo reruns this script when anything inside it changes.
    println!("cargo::rerun-if-changed={}", dist.display());
    let dist = dist.canonicalize().map_err(|error| {
        format!(
            "{}: {error} (build it: cd web && npm ci && npm run build)",
            dist.display()
        )
    })?;
    let mut files = Vec::new();
    collect(&dist, &dist, &mut files)?;
    files.sort();
    let mut table = String::from("&[\n");
    for (url, path) in &files {
        writeln!(table, "    ({url:?}, include_bytes!({path:?})),")?;
    }
    table.push_str("]\n");
    let out = PathBuf::from(std::env::var("OUT_DIR")?).join("web_assets.rs");
    std::fs::write(out, table)?;
    Ok(())
}

/// Every file below `dir` as (`/relative/path`, absolute path).
fn collect(
    root: &Path,
    dir: &Path,
    files: &mut Vec<(String, String)>,
) -> Result<(), Box<dyn Error>> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect(root, &path, files)?;
            continue;
        }
        let relative = path.strip_prefix(root)?;
        let url = relative
            .components()
            .map(|part| {
                part.as_os_str()
                    .to_str()
                    .ok_or("non-UTF-8 file name in web/dist")
            })
            .try_fold(String::new(), |mut url, part| {
                url.push('/');
                url.push_str(part?);
                Ok::<_, &str>(url)
            })?;
        let absolute = path
            .to_str()
            .ok_or("non-UTF-8 path of web/dist")?
            .to_owned();
        files.push((url, absolute));
    }
    Ok(())
}
