//! Pure build step: a ChatDeployment and its compiled routes become the
//! desired child objects. No I/O here; the controller applies the result.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HorizontalPodAutoscaler, HorizontalPodAutoscalerSpec,
    MetricIdentifier, MetricSpec, MetricTarget, PodsMetricSource, ResourceMetricSource,
};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities as LinuxCapabilities, ConfigMap, Container, ContainerPort,
    EmptyDirVolumeSource, EnvVar, EnvVarSource, HTTPGetAction, Lifecycle, LifecycleHandler,
    ObjectFieldSelector, PodAffinityTerm, PodAntiAffinity, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, SeccompProfile, SecretKeySelector, SecurityContext, Service,
    ServiceAccount, ServicePort, ServiceSpec, SleepAction, Volume, VolumeMount,
    WeightedPodAffinityTerm,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::{Resource, ResourceExt};
use parley_crds::{
    AccountingMode, ChatDeployment, ChatDeploymentSpec, Provider, ROUTES_CONFIGMAP_KEY,
    SecretKeyRef, Storage,
};

use crate::Error;
use crate::routes::CompiledRoutes;

/// Field manager of every server-side apply the operator sends.
pub const FIELD_MANAGER: &str = "parley-operator";
/// Label every child carries; the operator's watches select on it.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const INSTANCE_LABEL: &str = "app.kubernetes.io/instance";
pub const NAME_LABEL: &str = "app.kubernetes.io/name";
const APP_NAME: &str = "parley-service";
const HTTP_PORT: i32 = 8080;
const DATA_DIR: &str = "/var/lib/parley";
const SERVICE_UID: i64 = 65532;
/// Seconds the preStop hook waits so endpoints drop the pod before SIGTERM.
const PRE_STOP_SLEEP_SECONDS: i64 = 5;
/// Shutdown margin beyond the longest stream: preStop plus settling and saving.
const DRAIN_MARGIN_SECONDS: i64 = 30;
/// Seconds the service's shutdown drain adds to its stream drain, for replies
/// ended with `SHUTTING_DOWN` to be stored and their connections to close;
/// with the preStop sleep it stays well inside [`DRAIN_MARGIN_SECONDS`].
const SAVE_MARGIN_SECONDS: i64 = 15;

/// What the API server offers, found by discovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// `autoscaling/v2` HorizontalPodAutoscaler (Kubernetes ≥ 1.23).
    pub autoscaling_v2: bool,
    /// `policy/v1` PodDisruptionBudget (Kubernetes ≥ 1.21).
    pub policy_v1: bool,
    /// `monitoring.coreos.com/v1` ServiceMonitor CRD installed.
    pub service_monitor: bool,
    /// `lifecycle.preStop.sleep` (Kubernetes ≥ 1.30); otherwise no preStop
    /// hook and the service drains on SIGTERM alone.
    pub pre_stop_sleep: bool,
}

impl Capabilities {
    /// A current cluster with the Prometheus operator.
    pub const CURRENT: Capabilities = Capabilities {
        autoscaling_v2: true,
        policy_v1: true,
        service_monitor: true,
        pre_stop_sleep: true,
    };
}

/// Every object a ChatDeployment owns; the optional ones are `None` when the
/// cluster lacks their API.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub service_account: ServiceAccount,
    pub role: Role,
    pub role_binding: RoleBinding,
    pub routes: ConfigMap,
    pub service: Service,
    pub deployment: Deployment,
    pub autoscaler: Option<HorizontalPodAutoscaler>,
    pub disruption_budget: Option<PodDisruptionBudget>,
    pub service_monitor: Option<DynamicObject>,
}

/// Name of the routes ConfigMap of a ChatDeployment.
pub fn routes_configmap_name(chat_name: &str) -> String {
    format!("{chat_name}-routes")
}

/// The ServiceMonitor kind (Prometheus operator).
pub fn service_monitor_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("monitoring.coreos.com", "v1", "ServiceMonitor"),
        "servicemonitors",
    )
}

struct Context<'a> {
    name: String,
    namespace: String,
    spec: &'a ChatDeploymentSpec,
    owner: OwnerReference,
    selector_labels: BTreeMap<String, String>,
    labels: BTreeMap<String, String>,
}

impl Context<'_> {
    fn metadata(&self, name: String) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.clone()),
            labels: Some(self.labels.clone()),
            owner_references: Some(vec![self.owner.clone()]),
            ..ObjectMeta::default()
        }
    }
}

/// Builds every child of `chat` from its spec and compiled routes.
pub fn build(
    chat: &ChatDeployment,
    routes: &CompiledRoutes,
    capabilities: Capabilities,
) -> Result<Desired, Error> {
    let name = chat.name_any();
    let namespace = chat.namespace().ok_or(Error::MissingNamespace)?;
    let owner = chat.controller_owner_ref(&()).ok_or(Error::MissingUid)?;
    let selector_labels = BTreeMap::from([
        (NAME_LABEL.to_owned(), APP_NAME.to_owned()),
        (INSTANCE_LABEL.to_owned(), name.clone()),
    ]);
    let mut labels = selector_labels.clone();
    labels.insert(MANAGED_BY_LABEL.to_owned(), FIELD_MANAGER.to_owned());
    let cx = Context {
        name,
        namespace,
        spec: &chat.spec,
        owner,
        selector_labels,
        labels,
    };
    Ok(Desired {
        service_account: service_account(&cx),
        role: role(&cx),
        role_binding: role_binding(&cx),
        routes: routes_configmap(&cx, routes)?,
        service: service(&cx),
        deployment: deployment(&cx, capabilities),
        autoscaler: capabilities.autoscaling_v2.then(|| autoscaler(&cx)),
        disruption_budget: capabilities.policy_v1.then(|| disruption_budget(&cx)),
        service_monitor: capabilities.service_monitor.then(|| service_monitor(&cx)),
    })
}

fn service_account(cx: &Context<'_>) -> ServiceAccount {
    let mut metadata = cx.metadata(cx.name.clone());
    if let Some(bedrock) = &cx.spec.providers.bedrock
        && !bedrock.service_account_annotations.is_empty()
    {
        metadata.annotations = Some(bedrock.service_account_annotations.clone());
    }
    ServiceAccount {
        metadata,
        automount_service_account_token: Some(true),
        ..ServiceAccount::default()
    }
}

/// Lets the pods watch their own routes ConfigMap and nothing else: `get`
/// at start, then `list` and `watch` with the field selector
/// `metadata.name=<name>`, which RBAC matches against `resourceNames`.
fn role(cx: &Context<'_>) -> Role {
    Role {
        metadata: cx.metadata(cx.name.clone()),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["configmaps".to_owned()]),
            resource_names: Some(vec![routes_configmap_name(&cx.name)]),
            verbs: ["get", "list", "watch"].map(String::from).to_vec(),
            ..PolicyRule::default()
        }]),
    }
}

fn role_binding(cx: &Context<'_>) -> RoleBinding {
    RoleBinding {
        metadata: cx.metadata(cx.name.clone()),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".to_owned(),
            kind: "Role".to_owned(),
            name: cx.name.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".to_owned(),
            name: cx.name.clone(),
            namespace: Some(cx.namespace.clone()),
            ..Subject::default()
        }]),
    }
}

fn routes_configmap(cx: &Context<'_>, routes: &CompiledRoutes) -> Result<ConfigMap, Error> {
    let document = routes.file.to_yaml()?;
    Ok(ConfigMap {
        metadata: cx.metadata(routes_configmap_name(&cx.name)),
        data: Some(BTreeMap::from([(
            ROUTES_CONFIGMAP_KEY.to_owned(),
            document,
        )])),
        ..ConfigMap::default()
    })
}

fn service(cx: &Context<'_>) -> Service {
    // Metrics are served on the API port; a separately named Service port
    // lets a ServiceMonitor (or a NetworkPolicy) address them on their own.
    let port = |name: &str, port: i32| ServicePort {
        name: Some(name.to_owned()),
        port,
        target_port: Some(IntOrString::String("http".to_owned())),
        protocol: Some("TCP".to_owned()),
        ..ServicePort::default()
    };
    Service {
        metadata: cx.metadata(cx.name.clone()),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_owned()),
            selector: Some(cx.selector_labels.clone()),
            ports: Some(vec![port("http", 80), port("metrics", 9090)]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn env_from_secret(name: &str, secret: &str, key: &str, optional: bool) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.to_owned(),
                key: key.to_owned(),
                optional: optional.then_some(true),
            }),
            ..EnvVarSource::default()
        }),
    }
}

fn env_secret_ref(name: &str, secret: &SecretKeyRef) -> EnvVar {
    env_from_secret(name, &secret.name, &secret.key, false)
}

/// The service's environment: the `PARLEY_*` settings service/README.md documents.
fn environment(cx: &Context<'_>) -> Vec<EnvVar> {
    let spec = cx.spec;
    let mut vars = vec![
        env("PARLEY_LISTEN", format!("0.0.0.0:{HTTP_PORT}")),
        // Watched through the API (the Role below allows exactly this), so a
        // route change reaches every pod in seconds without a restart.
        env("PARLEY_ROUTES_CONFIGMAP", routes_configmap_name(&cx.name)),
        EnvVar {
            name: "POD_NAMESPACE".to_owned(),
            value: None,
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "metadata.namespace".to_owned(),
                    api_version: None,
                }),
                ..EnvVarSource::default()
            }),
        },
        env("PARLEY_DATA_DIR", DATA_DIR),
    ];
    if let Some(Storage::Mongodb(mongodb)) = spec.storage.chosen() {
        vars.push(env_secret_ref(
            "PARLEY_MONGODB_URI",
            &mongodb.uri_secret_ref,
        ));
        vars.push(env("PARLEY_MONGODB_DATABASE", mongodb.database.clone()));
    }
    if let Some(redis) = &spec.redis {
        vars.push(env_secret_ref("PARLEY_REDIS_URL", &redis.url_secret_ref));
    }
    let auth = &spec.auth;
    if let Some(secret) = &auth.jwt_secret_ref {
        vars.push(env_secret_ref("PARLEY_JWT_SECRET", secret));
    }
    for (name, value) in [
        ("PARLEY_JWKS_URL", &auth.jwks_url),
        ("PARLEY_JWT_ISSUER", &auth.issuer),
        ("PARLEY_JWT_AUDIENCE", &auth.audience),
    ] {
        if let Some(value) = value {
            vars.push(env(name, value.clone()));
        }
    }
    vars.push(env(
        "PARLEY_INITIAL_CREDITS",
        spec.accounting.initial_credits.to_string(),
    ));
    if spec.accounting.mode == AccountingMode::External
        && let Some(url) = &spec.accounting.external_url
    {
        vars.push(env("PARLEY_ACCOUNTING_URL", url.clone()));
    }
    if let Some(bedrock) = &spec.providers.bedrock {
        vars.push(env("AWS_REGION", bedrock.region.clone()));
        if let Some(endpoint) = &bedrock.endpoint_url {
            vars.push(env("PARLEY_BEDROCK_ENDPOINT_URL", endpoint.clone()));
        }
        if let Some(secret) = &bedrock.credentials_secret_ref {
            vars.push(env_from_secret(
                "AWS_ACCESS_KEY_ID",
                &secret.name,
                "AWS_ACCESS_KEY_ID",
                false,
            ));
            vars.push(env_from_secret(
                "AWS_SECRET_ACCESS_KEY",
                &secret.name,
                "AWS_SECRET_ACCESS_KEY",
                false,
            ));
            vars.push(env_from_secret(
                "AWS_SESSION_TOKEN",
                &secret.name,
                "AWS_SESSION_TOKEN",
                true,
            ));
        }
    }
    if let Some(openai) = &spec.providers.openai {
        vars.push(env("PARLEY_OPENAI_BASE_URL", openai.base_url.clone()));
        if let Some(key) = &openai.api_key_secret_ref {
            vars.push(env_secret_ref("PARLEY_OPENAI_API_KEY", key));
        }
    }
    let limits = &spec.rate_limits;
    // The longest a reply may run is also how long shutdown lets replies
    // finish (and, with a margin, the pods' termination grace period).
    let stream_drain_seconds = spec.max_stream_duration_seconds;
    vars.extend([
        env(
            "PARLEY_RATE_LIMIT_REQUESTS_PER_MINUTE",
            limits.requests_per_minute.to_string(),
        ),
        env(
            "PARLEY_RATE_LIMIT_TOKENS_PER_MINUTE",
            limits.tokens_per_minute.to_string(),
        ),
        env(
            "PARLEY_RATE_LIMIT_CONCURRENT_STREAMS",
            limits.concurrent_streams.to_string(),
        ),
        env(
            "PARLEY_REATTACH_GRACE_SECONDS",
            spec.observation.reattach_grace_seconds.to_string(),
        ),
        env(
            "PARLEY_OBSERVATION",
            if spec.observation.enabled {
                "on"
            } else {
                "off"
            },
        ),
        env(
            "PARLEY_MAX_STREAM_SECONDS",
            spec.max_stream_duration_seconds.to_string(),
        ),
        env(
            "PARLEY_STREAM_DRAIN_SECONDS",
            stream_drain_seconds.to_string(),
        ),
        env(
            "PARLEY_SHUTDOWN_DRAIN_SECONDS",
            (i64::from(stream_drain_seconds) + SAVE_MARGIN_SECONDS).to_string(),
        ),
    ]);
    vars
}

fn http_probe(path: &str, period_seconds: i32, failure_threshold: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String("http".to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period_seconds),
        failure_threshold: Some(failure_threshold),
        timeout_seconds: Some(2),
        ..Probe::default()
    }
}

fn volumes(cx: &Context<'_>) -> (Vec<Volume>, Vec<VolumeMount>) {
    let data_limit = cx
        .spec
        .storage
        .embedded
        .as_ref()
        .and_then(|e| e.size_limit.clone());
    let volumes = vec![
        Volume {
            name: "data".to_owned(),
            empty_dir: Some(EmptyDirVolumeSource {
                size_limit: data_limit,
                medium: None,
            }),
            ..Volume::default()
        },
        Volume {
            name: "tmp".to_owned(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
    ];
    let mount = |name: &str, path: &str| VolumeMount {
        name: name.to_owned(),
        mount_path: path.to_owned(),
        ..VolumeMount::default()
    };
    let mounts = vec![mount("data", DATA_DIR), mount("tmp", "/tmp")];
    (volumes, mounts)
}

fn deployment(cx: &Context<'_>, capabilities: Capabilities) -> Deployment {
    let spec = cx.spec;
    let (volumes, volume_mounts) = volumes(cx);
    let grace_seconds = i64::from(spec.max_stream_duration_seconds) + DRAIN_MARGIN_SECONDS;
    let lifecycle = capabilities.pre_stop_sleep.then(|| Lifecycle {
        pre_stop: Some(LifecycleHandler {
            sleep: Some(SleepAction {
                seconds: PRE_STOP_SLEEP_SECONDS,
            }),
            ..LifecycleHandler::default()
        }),
        ..Lifecycle::default()
    });
    let container = Container {
        name: "parley".to_owned(),
        image: Some(spec.image.clone()),
        args: Some(vec!["serve".to_owned()]),
        ports: Some(vec![ContainerPort {
            name: Some("http".to_owned()),
            container_port: HTTP_PORT,
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        }]),
        env: Some(environment(cx)),
        resources: spec.resources.clone(),
        liveness_probe: Some(http_probe("/health", 10, 3)),
        readiness_probe: Some(http_probe("/ready", 5, 2)),
        lifecycle,
        volume_mounts: Some(volume_mounts),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(LinuxCapabilities {
                drop: Some(vec!["ALL".to_owned()]),
                add: None,
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };
    let anti_affinity = Affinity {
        pod_anti_affinity: Some(PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![
                WeightedPodAffinityTerm {
                    weight: 100,
                    pod_affinity_term: PodAffinityTerm {
                        label_selector: Some(LabelSelector {
                            match_labels: Some(cx.selector_labels.clone()),
                            match_expressions: None,
                        }),
                        topology_key: "kubernetes.io/hostname".to_owned(),
                        ..PodAffinityTerm::default()
                    },
                },
            ]),
            ..PodAntiAffinity::default()
        }),
        ..Affinity::default()
    };
    Deployment {
        metadata: cx.metadata(cx.name.clone()),
        spec: Some(DeploymentSpec {
            // With an autoscaler the replica count is its field; setting it
            // here too would make every apply fight the autoscaler.
            replicas: (!capabilities.autoscaling_v2).then_some(spec.replicas.min),
            selector: LabelSelector {
                match_labels: Some(cx.selector_labels.clone()),
                match_expressions: None,
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".to_owned()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(cx.labels.clone()),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(cx.name.clone()),
                    termination_grace_period_seconds: Some(grace_seconds),
                    affinity: Some(anti_affinity),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(SERVICE_UID),
                        run_as_group: Some(SERVICE_UID),
                        fs_group: Some(SERVICE_UID),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".to_owned(),
                            localhost_profile: None,
                        }),
                        ..PodSecurityContext::default()
                    }),
                    containers: vec![container],
                    volumes: Some(volumes),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

fn autoscaler(cx: &Context<'_>) -> HorizontalPodAutoscaler {
    let autoscaling = &cx.spec.autoscaling;
    let mut metrics = vec![MetricSpec {
        type_: "Resource".to_owned(),
        resource: Some(ResourceMetricSource {
            name: "cpu".to_owned(),
            target: MetricTarget {
                type_: "Utilization".to_owned(),
                average_utilization: Some(autoscaling.target_cpu_utilization_percentage),
                ..MetricTarget::default()
            },
        }),
        ..MetricSpec::default()
    }];
    if let Some(streams) = autoscaling.target_active_streams_per_pod {
        metrics.push(MetricSpec {
            type_: "Pods".to_owned(),
            pods: Some(PodsMetricSource {
                metric: MetricIdentifier {
                    name: "parley_active_streams".to_owned(),
                    selector: None,
                },
                target: MetricTarget {
                    type_: "AverageValue".to_owned(),
                    average_value: Some(k8s_openapi::apimachinery::pkg::api::resource::Quantity(
                        streams.to_string(),
                    )),
                    ..MetricTarget::default()
                },
            }),
            ..MetricSpec::default()
        });
    }
    HorizontalPodAutoscaler {
        metadata: cx.metadata(cx.name.clone()),
        spec: Some(HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("apps/v1".to_owned()),
                kind: "Deployment".to_owned(),
                name: cx.name.clone(),
            },
            min_replicas: Some(cx.spec.replicas.min),
            max_replicas: cx.spec.replicas.max,
            metrics: Some(metrics),
            behavior: None,
        }),
        ..HorizontalPodAutoscaler::default()
    }
}

fn disruption_budget(cx: &Context<'_>) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: cx.metadata(cx.name.clone()),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(cx.selector_labels.clone()),
                match_expressions: None,
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

fn service_monitor(cx: &Context<'_>) -> DynamicObject {
    let mut monitor = DynamicObject::new(&cx.name, &service_monitor_resource())
        .within(&cx.namespace)
        .data(serde_json::json!({
            "spec": {
                "selector": {"matchLabels": cx.selector_labels},
                "endpoints": [{"port": "metrics", "path": "/metrics", "interval": "30s"}],
            }
        }));
    monitor.metadata.labels = Some(cx.labels.clone());
    monitor.metadata.owner_references = Some(vec![cx.owner.clone()]);
    monitor
}

/// Providers the routes use but the spec does not configure.
pub fn unconfigured_providers(spec: &ChatDeploymentSpec, routes: &CompiledRoutes) -> Vec<Provider> {
    let mut missing: Vec<Provider> = routes
        .file
        .routes
        .iter()
        .flat_map(|route| route.providers())
        .filter(|provider| match provider {
            Provider::Bedrock => spec.providers.bedrock.is_none(),
            Provider::Openai => spec.providers.openai.is_none(),
            Provider::Simulated => false,
        })
        .collect();
    missing.sort_by_key(|provider| provider.as_str());
    missing.dedup();
    missing
}
