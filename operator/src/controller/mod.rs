//! The controllers and the code that talks to the API server.

pub mod chat_deployment;
pub mod model_route;
mod service_monitor;

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use k8s_openapi::NamespaceResourceScope;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::build::{Capabilities, FIELD_MANAGER};
use crate::metrics::{ControllerLabels, FailureLabels, Metrics};

/// Consecutive failures per object: retries back off exponentially from the
/// error kind's base delay, and a success starts over.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: Mutex<HashMap<String, u32>>,
}

/// Retries of one object never wait longer than this (unless the base does).
const MAX_RETRY_DELAY: Duration = Duration::from_secs(300);

impl Backoff {
    /// Counts a failure of `key` and returns how long to wait before retrying.
    pub fn next_delay(&self, key: &str, base: Duration) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        let count = failures.entry(key.to_owned()).or_default();
        *count = count.saturating_add(1);
        let doublings = (*count - 1).min(10);
        base.saturating_mul(1 << doublings)
            .min(MAX_RETRY_DELAY.max(base))
    }

    pub fn reset(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(key);
    }
}

/// Identifies an object in logs, backoff and [`Reconciled`].
fn object_key(controller: &str, namespace: Option<&str>, name: &str) -> String {
    format!("{controller}/{}/{name}", namespace.unwrap_or_default())
}

/// What every reconciliation shares.
pub struct Context {
    pub client: Client,
    pub capabilities: Capabilities,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    /// Watch only this namespace; `None` watches the whole cluster.
    pub namespace: Option<String>,
    pub reconciled: Arc<Reconciled>,
    pub backoff: Backoff,
    /// Objects whose last reconciliation failed (key to the start of the
    /// first failed attempt), for the pending gauge and time to converge.
    pending: Mutex<HashMap<String, (&'static str, Instant)>>,
}

impl Context {
    pub fn new(
        client: Client,
        capabilities: Capabilities,
        metrics: Arc<Metrics>,
        settings: Settings,
    ) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.to_owned(),
            instance: settings.instance.clone(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            capabilities,
            metrics,
            namespace: settings.namespace,
            reconciled: settings.reconciled,
            backoff: Backoff::default(),
            pending: Mutex::default(),
        }
    }

    /// An Api over the watched scope.
    fn scoped<K>(&self) -> Api<K>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
    {
        match &self.namespace {
            Some(namespace) => Api::namespaced(self.client.clone(), namespace),
            None => Api::all(self.client.clone()),
        }
    }

    /// Records metrics and backoff state of one reconciliation of `object`.
    /// `observed_generation` is the one its status had before: a success
    /// counts towards time to converge only when it applied a change (a new
    /// generation, or one that failed before), not on a resync.
    fn record_outcome<K: Resource>(
        &self,
        controller: &'static str,
        object: &K,
        observed_generation: Option<i64>,
        started: Instant,
        result: &Result<(), &Error>,
    ) {
        let labels = ControllerLabels { controller };
        self.metrics
            .reconcile_duration
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
        let key = object_key(
            controller,
            object.meta().namespace.as_deref(),
            &object.name_any(),
        );
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        match result {
            Ok(()) => {
                self.backoff.reset(&key);
                let first_attempt = pending.remove(&key).map(|(_, since)| since);
                let changed = observed_generation != object.meta().generation;
                if let Some(since) = first_attempt.or(changed.then_some(started)) {
                    self.metrics
                        .time_to_converge
                        .get_or_create(&labels)
                        .observe(since.elapsed().as_secs_f64());
                }
            }
            Err(error) => {
                let failure = FailureLabels {
                    controller,
                    reason: error.kind(),
                };
                self.metrics
                    .reconcile_failures
                    .get_or_create(&failure)
                    .inc();
                pending.entry(key).or_insert((controller, started));
            }
        }
        Self::count_pending(&self.metrics, &pending, controller);
    }

    /// Forgets an object that was deleted while it waited for a retry.
    fn forget(&self, controller: &'static str, namespace: Option<&str>, name: &str) {
        let key = object_key(controller, namespace, name);
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        if pending.remove(&key).is_some() {
            self.backoff.reset(&key);
            Self::count_pending(&self.metrics, &pending, controller);
        }
    }

    fn count_pending(
        metrics: &Metrics,
        pending: &HashMap<String, (&'static str, Instant)>,
        controller: &'static str,
    ) {
        let count = pending.values().filter(|(c, _)| *c == controller).count();
        metrics
            .pending_objects
            .get_or_create(&ControllerLabels { controller })
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// The retry delay after `error` on `object`, backing off by kind and count.
    fn retry_delay<K: Resource>(&self, controller: &str, object: &K, error: &Error) -> Duration {
        let key = object_key(
            controller,
            object.meta().namespace.as_deref(),
            &object.name_any(),
        );
        self.backoff.next_delay(&key, error.retry_after())
    }

    /// Publishes an event; a failure to do so is logged, never fatal.
    async fn publish<K: Resource<DynamicType = ()>>(
        &self,
        object: &K,
        warning: bool,
        reason: &str,
        note: String,
    ) {
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.to_owned(),
            note: Some(note),
            action: "Reconcile".to_owned(),
            secondary: None,
        };
        if let Err(error) = self.recorder.publish(&event, &object.object_ref(&())).await {
            tracing::warn!(%error, reason, "could not publish event");
        }
    }
}

/// Server-side applies `object` as the operator's field manager.
pub async fn apply<K>(client: &Client, object: &K) -> Result<K, Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned,
{
    let namespace = object
        .meta()
        .namespace
        .as_deref()
        .ok_or(Error::MissingNamespace)?;
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let applied = api
        .patch(
            &object.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(object),
        )
        .await?;
    Ok(applied)
}

/// Completed reconciliations per object (`controller/namespace/name` to a
/// count), for whoever embeds the controllers and must know a pass is done.
pub type Reconciled = tokio::sync::watch::Sender<BTreeMap<String, u64>>;

/// Settings of [`run`].
#[derive(Debug, Clone)]
pub struct Settings {
    /// Watch only this namespace.
    pub namespace: Option<String>,
    /// This replica's name in the events it publishes.
    pub instance: Option<String>,
    pub reconciled: Arc<Reconciled>,
    /// How often API discovery runs again, so that an optional API (the
    /// ServiceMonitor CRD) installed or removed later is used or dropped
    /// without a restart.
    pub discovery_interval: Duration,
}

/// Default of [`Settings::discovery_interval`].
pub const DISCOVERY_INTERVAL: Duration = Duration::from_secs(30);

impl Default for Settings {
    fn default() -> Self {
        Self {
            namespace: None,
            instance: None,
            reconciled: Arc::default(),
            discovery_interval: DISCOVERY_INTERVAL,
        }
    }
}

/// Handles one result of a controller's stream: counts a completed
/// reconciliation, forgets an object deleted while it waited for a retry.
fn on_result<K, E, Q>(
    context: &Context,
    controller: &'static str,
    result: Result<
        (
            kube::runtime::reflector::ObjectRef<K>,
            kube::runtime::controller::Action,
        ),
        kube::runtime::controller::Error<E, Q>,
    >,
) where
    K: Resource,
    E: std::error::Error,
    Q: std::error::Error,
{
    match result {
        Ok((object, _)) => count_reconciled(&context.reconciled, controller, &object),
        Err(kube::runtime::controller::Error::ObjectNotFound(object)) => {
            context.forget(controller, object.namespace.as_deref(), &object.name);
        }
        Err(error) => tracing::debug!(%error, controller, "reconcile did not complete"),
    }
}

/// Counts a successful reconciliation of `object`.
fn count_reconciled<K: Resource>(
    reconciled: &Reconciled,
    controller: &str,
    object: &kube::runtime::reflector::ObjectRef<K>,
) {
    let key = object_key(controller, object.namespace.as_deref(), &object.name);
    reconciled.send_modify(|counts| *counts.entry(key).or_default() += 1);
}

const CRD_POLL_INTERVAL: Duration = Duration::from_secs(10);

/// Waits for the CRDs, then runs both controllers until `shutdown`. `ready`
/// is set once the controllers run and cleared when they stop.
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let mut poll = tokio::time::interval(CRD_POLL_INTERVAL);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            _ = poll.tick() => {}
        }
        let missing = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            missing = crate::discovery::missing_crds(&client) => missing?,
        };
        metrics
            .missing_crds
            .set(i64::try_from(missing).unwrap_or(i64::MAX));
        if missing == 0 {
            break;
        }
        tracing::warn!(
            missing,
            "Parley CRDs are not installed yet; waiting for them"
        );
    }
    let mut capabilities = tokio::select! {
        () = shutdown.cancelled() => return Ok(()),
        capabilities = crate::discovery::capabilities(&client) => capabilities?,
    };
    ready.store(true, Ordering::SeqCst);
    loop {
        log_capabilities(capabilities, &settings);
        let context = Arc::new(Context::new(
            client.clone(),
            capabilities,
            metrics.clone(),
            settings.clone(),
        ));
        // The controllers' watches are chosen from the capabilities: when the
        // cluster starts or stops serving an optional API, they restart on the
        // new ones (and every ChatDeployment is reconciled again).
        let generation = shutdown.child_token();
        let changed = tokio::join!(
            chat_deployment::run(context.clone(), generation.clone()),
            model_route::run(context, generation.clone()),
            rediscover(
                &client,
                capabilities,
                settings.discovery_interval,
                &generation
            ),
        )
        .2;
        match changed {
            Some(now) => capabilities = now,
            None => break,
        }
    }
    ready.store(false, Ordering::SeqCst);
    Ok(())
}

fn log_capabilities(capabilities: Capabilities, settings: &Settings) {
    if !capabilities.autoscaling_v2 {
        tracing::warn!(
            "autoscaling/v2 is not served: ChatDeployments get no HorizontalPodAutoscaler"
        );
    }
    if !capabilities.policy_v1 {
        tracing::warn!("policy/v1 is not served: ChatDeployments get no PodDisruptionBudget");
    }
    tracing::info!(?capabilities, namespace = ?settings.namespace, "starting controllers");
}

/// Runs discovery every `interval` until what the cluster serves differs
/// from `current`; then cancels `generation` and returns the new
/// capabilities. Returns `None` when `generation` is cancelled from outside
/// (shutdown). A failed discovery is logged and retried at the next tick:
/// the running controllers keep what they know.
async fn rediscover(
    client: &Client,
    current: Capabilities,
    interval: Duration,
    generation: &CancellationToken,
) -> Option<Capabilities> {
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = generation.cancelled() => return None,
            _ = ticker.tick() => {}
        }
        let found = tokio::select! {
            () = generation.cancelled() => return None,
            found = crate::discovery::capabilities(client) => found,
        };
        match found {
            Ok(found) if found != current => {
                tracing::info!(before = ?current, now = ?found, "the cluster's APIs changed; restarting the controllers on them");
                generation.cancel();
                return Some(found);
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "API discovery failed; keeping the known APIs"),
        }
    }
}
