//! Model routes: an immutable, validated snapshot swapped atomically on
//! reload, and the providers that serve their targets.
//!
//! A request takes an `Arc` of the current snapshot once, so a reply keeps
//! the route it started with however often the routes change meanwhile.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use parley_crds::{ModelRouteSpec, Pricing, Provider as ProviderKind, RouteTarget, RoutesFile};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

use crate::config::ReplyConfig;
use crate::error::Error;
use crate::identity::Role;
use crate::policy::{PolicyBook, ReplyPolicy};
use crate::providers::{BedrockProvider, Provider, ProviderError, ProviderErrorKind};

mod configmap;
mod price_book;

pub use configmap::RoutesConfigMap;
pub use price_book::{PriceBook, RoutePrice};

/// The model of the built-in `default` route used when no routes source is set.
pub const BUILTIN_SIMULATED_MODEL: &str = "parley-simulated";
const BUILTIN_MAX_OUTPUT_TOKENS: u32 = 1024;
const BUILTIN_TIMEOUT_SECONDS: u32 = 60;

/// One validated routes document, the prices of its targets and its
/// content policies, compiled once.
#[derive(Debug, Clone)]
pub struct Routes {
    file: RoutesFile,
    prices: PriceBook,
    policies: Arc<PolicyBook>,
}

/// Prices and policies are functions of the file.
impl PartialEq for Routes {
    fn eq(&self, other: &Self) -> bool {
        self.file == other.file
    }
}

impl Eq for Routes {}

impl Routes {
    /// One `default` route on the simulated model, priced like a small real
    /// model (1 credit per 1k input tokens, 2 per 1k output tokens) so the
    /// quick start meters replies exactly as a deployment does.
    pub fn builtin() -> Self {
        let file = RoutesFile {
            default_route: None,
            cohort_policies: Vec::new(),
            routes: vec![ModelRouteSpec {
                alias: parley_crds::IMPLICIT_DEFAULT_ROUTE.to_owned(),
                allowed_roles: parley_crds::Role::all(),
                fallback_on: Vec::new(),
                downgrade_when_unaffordable: false,
                limits: None,
                targets: vec![RouteTarget {
                    provider: ProviderKind::Simulated,
                    model: BUILTIN_SIMULATED_MODEL.to_owned(),
                    pricing: Pricing {
                        input_per_1k: parley_crds::Credits::from_whole(1),
                        output_per_1k: parley_crds::Credits::from_whole(2),
                    },
                    max_output_tokens: BUILTIN_MAX_OUTPUT_TOKENS,
                    timeout_seconds: BUILTIN_TIMEOUT_SECONDS,
                    circuit_breaker: parley_crds::CircuitBreaker::default(),
                    guardrail_identifier: None,
                    guardrail_version: None,
                    context_tokens: None,
                }],
                capabilities: Vec::new(),
                content_policy: None,
                system_prompt: None,
            }],
        };
        Self {
            prices: PriceBook::new(&file.routes),
            policies: Arc::new(PolicyBook::default()),
            file,
        }
    }

    pub fn prices(&self) -> &PriceBook {
        &self.prices
    }

    /// Parses and validates a routes document; every problem is reported.
    pub fn from_yaml(text: &str) -> Result<Self, Error> {
        let file = RoutesFile::from_yaml(text)
            .map_err(|error| Error::Config(format!("routes file: {error}")))?;
        file.validate()
            .map_err(|problems| Error::Config(format!("routes file: {problems}")))?;
        let policies = PolicyBook::compile(&file)
            .map_err(|error| Error::Config(format!("routes file: {error}")))?;
        Ok(Self {
            prices: PriceBook::new(&file.routes),
            policies: Arc::new(policies),
            file,
        })
    }

    /// The content rules of a reply on `route` by a user in `cohorts`.
    pub fn policy_for(&self, route: &str, cohorts: &[String]) -> ReplyPolicy {
        self.policies.for_reply(route, cohorts)
    }

    pub fn default_alias(&self) -> &str {
        self.file.default_alias()
    }

    /// Routes `role` may use, in file order.
    pub fn usable_by(&self, role: Role) -> impl Iterator<Item = &ModelRouteSpec> {
        self.usable_with_positions(role).map(|(_, route)| route)
    }

    /// [`Routes::usable_by`], each with its position in the file.
    fn usable_with_positions(&self, role: Role) -> impl Iterator<Item = (usize, &ModelRouteSpec)> {
        let role = crd_role(role);
        self.file
            .routes
            .iter()
            .enumerate()
            .filter(move |(_, route)| route.allowed_roles.contains(&role))
    }

    /// The route `alias` (the default one when `None`) if `role` may use it;
    /// otherwise `UnknownRoute` listing the aliases the role may use, so a
    /// forbidden route looks exactly like a missing one.
    pub fn resolve(&self, alias: Option<&str>, role: Role) -> Result<&ModelRouteSpec, Error> {
        self.position_of(alias, role)
            .map(|index| &self.file.routes[index])
    }

    /// [`Routes::resolve`], shared with the snapshot for a reply to keep.
    pub fn resolve_shared(
        self: &Arc<Self>,
        alias: Option<&str>,
        role: Role,
    ) -> Result<SharedRoute, Error> {
        self.position_of(alias, role).map(|index| self.share(index))
    }

    /// What the OpenAI-compatible API's `model` names: a route alias, or the
    /// model id of a route's first target (the first such route `role` may
    /// use, in file order), so the route's fallback, prices and limits apply
    /// as they do to the alias. Otherwise `UnknownRoute`, as [`Routes::resolve`].
    pub fn resolve_model(&self, name: &str, role: Role) -> Result<&ModelRouteSpec, Error> {
        self.position_of_model(name, role)
            .map(|index| &self.file.routes[index])
    }

    /// [`Routes::resolve_model`], shared with the snapshot for a reply to keep.
    pub fn resolve_model_shared(
        self: &Arc<Self>,
        name: &str,
        role: Role,
    ) -> Result<SharedRoute, Error> {
        self.position_of_model(name, role)
            .map(|index| self.share(index))
    }

    fn share(self: &Arc<Self>, index: usize) -> SharedRoute {
        SharedRoute {
            routes: Arc::clone(self),
            index,
        }
    }

    fn position_of(&self, alias: Option<&str>, role: Role) -> Result<usize, Error> {
        let alias = alias.unwrap_or_else(|| self.default_alias());
        self.position_where(role, |route| route.alias == alias)
            .ok_or_else(|| Error::UnknownRoute {
                requested: alias.to_owned(),
                allowed: self
                    .usable_by(role)
                    .map(|route| route.alias.clone())
                    .collect(),
            })
    }

    fn position_of_model(&self, name: &str, role: Role) -> Result<usize, Error> {
        self.position_of(Some(name), role).or_else(|unknown| {
            self.position_where(role, |route| {
                route
                    .targets
                    .first()
                    .is_some_and(|first| first.model == name)
            })
            .ok_or(unknown)
        })
    }

    /// The first route `role` may use that `matches`, in file order.
    fn position_where(
        &self,
        role: Role,
        matches: impl Fn(&ModelRouteSpec) -> bool,
    ) -> Option<usize> {
        self.usable_with_positions(role)
            .find(|(_, route)| matches(route))
            .map(|(position, _)| position)
    }
}

/// One route of a routes snapshot, kept by a reply as it was when the reply
/// arrived: a reload swaps the current snapshot, never this one. Sharing the
/// snapshot costs a reference count where a copy of the route cost four
/// allocations per reply, and 166 bytes of every open stream.
#[derive(Debug, Clone)]
pub struct SharedRoute {
    routes: Arc<Routes>,
    /// Always an index of `routes.file.routes`: only the snapshot makes one.
    index: usize,
}

impl std::ops::Deref for SharedRoute {
    type Target = ModelRouteSpec;

    fn deref(&self) -> &ModelRouteSpec {
        &self.routes.file.routes[self.index]
    }
}

fn crd_role(role: Role) -> parley_crds::Role {
    match role {
        Role::User => parley_crds::Role::User,
        Role::Supervisor => parley_crds::Role::Supervisor,
        Role::Admin => parley_crds::Role::Admin,
    }
}

/// The current routes; readers never block, reloads swap the whole snapshot.
pub struct RoutesCell {
    current: ArcSwap<Routes>,
    reload_failures: Counter,
}

impl RoutesCell {
    pub fn new(initial: Routes, registry: &mut Registry) -> Self {
        let reload_failures = Counter::default();
        registry.register(
            "parley_routes_reload_failures",
            "Routes reloads rejected (the last good routes stay in use)",
            reload_failures.clone(),
        );
        Self {
            current: ArcSwap::from_pointee(initial),
            reload_failures,
        }
    }

    pub fn snapshot(&self) -> Arc<Routes> {
        self.current.load_full()
    }

    /// Replaces the routes with `text` when it is valid; otherwise logs,
    /// counts the failure and keeps the current routes.
    pub fn reload_from_yaml(&self, text: &str, origin: &str) -> bool {
        match Routes::from_yaml(text) {
            Ok(routes) => {
                let aliases: Vec<&str> = routes
                    .file
                    .routes
                    .iter()
                    .map(|r| r.alias.as_str())
                    .collect();
                tracing::info!(%origin, ?aliases, "routes reloaded");
                self.current.store(Arc::new(routes));
                true
            }
            Err(error) => {
                self.reject(origin, &error);
                false
            }
        }
    }

    /// Counts and logs a routes version that could not be used.
    fn reject(&self, origin: &str, reason: &dyn std::fmt::Display) {
        self.reload_failures.inc();
        tracing::error!(%origin, %reason, "routes reload rejected; keeping the last good routes");
    }
}

/// Where the routes come from. The ConfigMap is for a cluster (the operator
/// writes it), the file for local runs; setting both is a configuration
/// error rather than a precedence rule to remember.
pub enum RoutesSource {
    /// One `default` route on the simulated model.
    Builtin,
    File(PathBuf),
    ConfigMap(Box<RoutesConfigMap>),
}

impl RoutesSource {
    /// The source `config` names; a ConfigMap gets a client from the standard
    /// chain (in-cluster, or `KUBECONFIG`).
    pub async fn from_config(config: &ReplyConfig) -> Result<Self, Error> {
        match (&config.routes_file, &config.routes_configmap) {
            (Some(_), Some(_)) => Err(Error::Config(
                "PARLEY_ROUTES_FILE and PARLEY_ROUTES_CONFIGMAP are both set; set one: \
                 the ConfigMap in a cluster, the file for local runs"
                    .to_owned(),
            )),
            (Some(path), None) => Ok(Self::File(path.clone())),
            (None, Some(name)) => {
                let client = kube::Client::try_default().await.map_err(|error| {
                    Error::Config(format!(
                        "PARLEY_ROUTES_CONFIGMAP needs a kube client: {error}"
                    ))
                })?;
                Ok(Self::ConfigMap(Box::new(RoutesConfigMap::new(
                    client,
                    config.routes_configmap_namespace.as_deref(),
                    name,
                ))))
            }
            (None, None) => Ok(Self::Builtin),
        }
    }

    /// The routes at start: a bad or missing source at start is a
    /// configuration error (later, a bad version is only rejected).
    pub async fn load(&self) -> Result<Routes, Error> {
        match self {
            Self::Builtin => Ok(Routes::builtin()),
            Self::File(path) => {
                let text = tokio::fs::read_to_string(path).await.map_err(|error| {
                    Error::io(format!("reading routes file {}", path.display()), error)
                })?;
                Routes::from_yaml(&text)
            }
            Self::ConfigMap(configmap) => configmap.load().await,
        }
    }

    /// Keeps `cell` current until `shutdown` (the built-in routes never change).
    pub async fn watch(self, cell: Arc<RoutesCell>, poll: Duration, shutdown: CancellationToken) {
        match self {
            Self::Builtin => {}
            Self::File(path) => watch_routes_file(cell, path, poll, shutdown).await,
            Self::ConfigMap(configmap) => configmap.watch(cell, shutdown).await,
        }
    }
}

/// Polls `path` every `interval` and reloads when its modification time or
/// content changes, until `shutdown`. Polling (not inotify) because
/// ConfigMap volumes swap a symlink, which inotify watches miss.
pub async fn watch_routes_file(
    cell: Arc<RoutesCell>,
    path: PathBuf,
    interval: Duration,
    shutdown: CancellationToken,
) {
    // The first poll applies the file as found, so a change between the
    // start-up load and this task's start is not missed.
    let mut last_seen: Option<Option<Fingerprint>> = None;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let seen = file_fingerprint(&path).await;
        if last_seen.as_ref() == Some(&seen) {
            continue;
        }
        match &seen {
            Some((_, _, text)) => {
                cell.reload_from_yaml(text, &path.display().to_string());
            }
            None => cell.reject(&path.display().to_string(), &"routes file unreadable"),
        }
        last_seen = Some(seen);
    }
}

/// Modification time, content hash and content of the file, `None` when unreadable.
type Fingerprint = (Option<SystemTime>, u64, String);

async fn file_fingerprint(path: &PathBuf) -> Option<Fingerprint> {
    let text = tokio::fs::read_to_string(path).await.ok()?;
    let modified = tokio::fs::metadata(path)
        .await
        .ok()
        .and_then(|m| m.modified().ok());
    let mut hasher = DefaultHasher::new();
    text.hash(&mut hasher);
    Some((modified, hasher.finish(), text))
}

/// One provider per kind; the model comes with each request.
pub struct ProviderRegistry {
    simulated: Arc<dyn Provider>,
    openai: Option<Arc<dyn Provider>>,
    /// Built on first use: loading the AWS chain may query instance
    /// metadata, which a service without Bedrock targets never needs.
    bedrock: OnceCell<Arc<dyn Provider>>,
    bedrock_endpoint_url: Option<String>,
}

impl ProviderRegistry {
    pub fn new(
        simulated: Arc<dyn Provider>,
        openai: Option<Arc<dyn Provider>>,
        bedrock_endpoint_url: Option<String>,
    ) -> Self {
        Self {
            simulated,
            openai,
            bedrock: OnceCell::new(),
            bedrock_endpoint_url,
        }
    }

    /// Uses `provider` for Bedrock targets instead of the AWS chain.
    pub fn with_bedrock(mut self, provider: Arc<dyn Provider>) -> Self {
        self.bedrock = OnceCell::new_with(Some(provider));
        self
    }

    /// The provider serving `target`; a kind without configuration counts as
    /// unavailable, so the route falls back past it.
    pub async fn for_target(
        &self,
        target: &RouteTarget,
    ) -> Result<Arc<dyn Provider>, ProviderError> {
        match target.provider {
            ProviderKind::Simulated => Ok(Arc::clone(&self.simulated)),
            ProviderKind::Openai => self.openai.clone().ok_or_else(|| {
                ProviderError::new(
                    ProviderErrorKind::Unavailable,
                    "no OpenAI-compatible server is configured (PARLEY_OPENAI_BASE_URL)",
                )
            }),
            ProviderKind::Bedrock => Ok(Arc::clone(
                self.bedrock
                    .get_or_init(|| async {
                        // Boxed: loading the AWS configuration is a future of
                        // many KiB, and unboxed every reply task would keep
                        // room for it while it streams (it runs once).
                        let provider = Box::pin(BedrockProvider::from_environment(
                            self.bedrock_endpoint_url.as_deref(),
                        ))
                        .await;
                        Arc::new(provider) as Arc<dyn Provider>
                    })
                    .await,
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_ROUTES: &str = "
routes:
  - alias: default
    targets:
      - provider: simulated
        model: sim
        pricing: {inputPer1k: 1, outputPer1k: 2}
        maxOutputTokens: 100
  - alias: staff
    allowedRoles: [admin]
    targets:
      - provider: openai
        model: big
        pricing: {inputPer1k: 3, outputPer1k: 4}
        maxOutputTokens: 100
";

    #[test]
    fn unknown_and_forbidden_routes_list_the_allowed_ones() {
        let routes = Routes::from_yaml(TWO_ROUTES).unwrap();
        assert_eq!(routes.resolve(None, Role::User).unwrap().alias, "default");
        assert_eq!(
            routes.resolve(Some("staff"), Role::Admin).unwrap().alias,
            "staff"
        );
        for alias in ["staff", "nope"] {
            match routes.resolve(Some(alias), Role::User) {
                Err(Error::UnknownRoute { requested, allowed }) => {
                    assert_eq!(requested, alias);
                    assert_eq!(allowed, ["default"]);
                }
                other => panic!("expected UnknownRoute, got {other:?}"),
            }
        }
    }

    #[test]
    fn a_model_is_a_usable_alias_or_a_usable_routes_first_model() {
        let routes = Routes::from_yaml(TWO_ROUTES).unwrap();
        assert_eq!(
            routes.resolve_model("sim", Role::User).unwrap().alias,
            "default"
        );
        assert_eq!(
            routes.resolve_model("big", Role::Admin).unwrap().alias,
            "staff"
        );
        for model in ["big", "staff", "nope"] {
            match routes.resolve_model(model, Role::User) {
                Err(Error::UnknownRoute { requested, allowed }) => {
                    assert_eq!(requested, model);
                    assert_eq!(allowed, ["default"]);
                }
                other => panic!("expected UnknownRoute, got {other:?}"),
            }
        }
    }

    #[test]
    fn a_shared_route_is_the_resolved_one_and_keeps_its_snapshot_across_reloads() {
        let mut registry = Registry::default();
        let cell = RoutesCell::new(Routes::from_yaml(TWO_ROUTES).unwrap(), &mut registry);
        let routes = cell.snapshot();
        let staff = routes.resolve_shared(Some("staff"), Role::Admin).unwrap();
        assert_eq!(*staff, *routes.resolve(Some("staff"), Role::Admin).unwrap());
        let by_model = routes.resolve_model_shared("sim", Role::User).unwrap();
        assert_eq!(by_model.alias, "default");
        for refused in [
            routes.resolve_shared(Some("staff"), Role::User),
            routes.resolve_model_shared("big", Role::User),
        ] {
            assert!(matches!(refused, Err(Error::UnknownRoute { .. })));
        }
        drop(routes);
        // The reload replaces the cell's snapshot; the shared routes keep theirs.
        assert!(cell.reload_from_yaml(&TWO_ROUTES.replace("model: big", "model: bigger"), "test"));
        assert_eq!(staff.targets[0].model, "big");
        assert_eq!(by_model.targets[0].model, "sim");
        let reloaded = cell.snapshot();
        let staff_now = reloaded.resolve(Some("staff"), Role::Admin).unwrap();
        assert_eq!(staff_now.targets[0].model, "bigger");
    }

    #[tokio::test]
    async fn a_routes_file_and_a_routes_configmap_together_are_refused() {
        let config = crate::config::Config::from_args([
            "parley-service",
            "--routes-file",
            "routes.yaml",
            "--routes-configmap",
            "demo-routes",
        ])
        .unwrap();
        match RoutesSource::from_config(&config.replies).await {
            Err(Error::Config(message)) => assert!(message.contains("both set"), "{message}"),
            Err(other) => panic!("expected a configuration error, got {other:?}"),
            Ok(_) => panic!("expected a configuration error"),
        }
    }

    #[test]
    fn invalid_reloads_keep_the_last_good_routes() {
        let mut registry = Registry::default();
        let cell = RoutesCell::new(Routes::builtin(), &mut registry);
        let held = cell.snapshot();
        assert!(!cell.reload_from_yaml("routes: [{alias: x, targets: []}]", "test"));
        assert_eq!(*cell.snapshot(), Routes::builtin());
        assert_eq!(cell.reload_failures.get(), 1);
        assert!(cell.reload_from_yaml(TWO_ROUTES, "test"));
        assert_eq!(cell.snapshot().usable_by(Role::Admin).count(), 2);
        // A reply that took the old snapshot keeps it.
        assert_eq!(*held, Routes::builtin());
    }
}
