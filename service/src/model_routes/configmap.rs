//! The routes ConfigMap, read at start and then watched through the
//! Kubernetes API: a change reaches the service in about a second, where a
//! mounted ConfigMap volume lags by the kubelet's sync period.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use parley_crds::ROUTES_CONFIGMAP_KEY;
use tokio_util::sync::CancellationToken;

use super::{Routes, RoutesCell};
use crate::error::Error;

/// One named ConfigMap holding the routes document under `routes.yaml`.
#[derive(Clone)]
pub struct RoutesConfigMap {
    api: Api<ConfigMap>,
    name: String,
    /// `configmap NAMESPACE/NAME`, for logs and errors.
    origin: String,
}

/// What the watch last saw, so the repeats of a re-list after a reconnect
/// are neither reapplied nor counted again.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Routes(String),
    NoRoutesKey,
    Absent,
}

impl RoutesConfigMap {
    /// The ConfigMap `name` in `namespace` (unset: the client's default namespace).
    pub fn new(client: Client, namespace: Option<&str>, name: &str) -> Self {
        let namespace =
            namespace.map_or_else(|| client.default_namespace().to_owned(), str::to_owned);
        let origin = format!("configmap {namespace}/{name}");
        Self {
            api: Api::namespaced(client, &namespace),
            name: name.to_owned(),
            origin,
        }
    }

    /// The routes as the ConfigMap holds them now.
    pub async fn load(&self) -> Result<Routes, Error> {
        let configmap = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|error| Error::Config(format!("reading {}: {error}", self.origin)))?;
        match seen(configmap.as_ref()) {
            Seen::Routes(text) => Routes::from_yaml(&text),
            Seen::NoRoutesKey => Err(Error::Config(format!(
                "{} has no `{ROUTES_CONFIGMAP_KEY}` key",
                self.origin
            ))),
            Seen::Absent => Err(Error::Config(format!("{} does not exist", self.origin))),
        }
    }

    /// Feeds every version of the ConfigMap into `cell` until `shutdown`.
    /// Watch errors (API server away, RBAC) are logged and retried with
    /// backoff; the last good routes stay in use meanwhile.
    pub async fn watch(self, cell: Arc<RoutesCell>, shutdown: CancellationToken) {
        let selector = format!("metadata.name={}", self.name);
        let events = watcher::watcher(
            self.api.clone(),
            watcher::Config::default().fields(&selector),
        )
        .default_backoff();
        tokio::pin!(events);
        // Like the file poller, the first version is applied as found, so a
        // change between the start-up load and this task's start is not missed.
        let mut last: Option<Seen> = None;
        // Whether the re-list under way has listed the ConfigMap.
        let mut listed = false;
        loop {
            let event = tokio::select! {
                () = shutdown.cancelled() => return,
                event = events.next() => event,
            };
            let seen_now = match event {
                // The watcher's stream never ends; if it did, routes stay as they are.
                None => return,
                Some(Err(error)) => {
                    tracing::warn!(origin = %self.origin, %error, "routes ConfigMap watch failed; retrying");
                    continue;
                }
                Some(Ok(Event::Init)) => {
                    listed = false;
                    continue;
                }
                Some(Ok(Event::InitApply(configmap))) => {
                    listed = true;
                    seen(Some(&configmap))
                }
                Some(Ok(Event::Apply(configmap))) => seen(Some(&configmap)),
                Some(Ok(Event::InitDone)) if listed => continue,
                Some(Ok(Event::InitDone | Event::Delete(_))) => Seen::Absent,
            };
            if last.as_ref() == Some(&seen_now) {
                continue;
            }
            match &seen_now {
                Seen::Routes(text) => {
                    cell.reload_from_yaml(text, &self.origin);
                }
                Seen::NoRoutesKey => cell.reject(
                    &self.origin,
                    &format_args!("no `{ROUTES_CONFIGMAP_KEY}` key"),
                ),
                Seen::Absent => cell.reject(&self.origin, &"the ConfigMap does not exist"),
            }
            last = Some(seen_now);
        }
    }
}

fn seen(configmap: Option<&ConfigMap>) -> Seen {
    let Some(configmap) = configmap else {
        return Seen::Absent;
    };
    configmap
        .data
        .as_ref()
        .and_then(|data| data.get(ROUTES_CONFIGMAP_KEY))
        .map_or(Seen::NoRoutesKey, |text| Seen::Routes(text.clone()))
}
