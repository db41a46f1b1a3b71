//! The pure build step: representative specs to desired objects, no cluster.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use k8s_openapi::api::core::v1::{Container, EnvVar, PodSpec};
use parley_crds::{
    ChatDeployment, Credits, EmbeddedStorage, ModelRoute, ProblemKind, RoutesFile, StorageSpec,
};
use parley_operator::build::{Capabilities, Desired, build};
use parley_operator::routes::{CompiledRoutes, compile};
use parley_operator::status::{Observation, Rollout, chat_status, route_problems, spec_problems};

const NS: &str = "team-a";

fn compiled(chat: &ChatDeployment, routes: &[ModelRoute]) -> CompiledRoutes {
    let refs: Vec<&ModelRoute> = routes.iter().collect();
    compile(chat, &refs)
}

fn desired(chat: &ChatDeployment, routes: &[ModelRoute], capabilities: Capabilities) -> Desired {
    build(chat, &compiled(chat, routes), capabilities).unwrap()
}

fn pod_spec(desired: &Desired) -> &PodSpec {
    desired
        .deployment
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
}

fn container(desired: &Desired) -> &Container {
    &pod_spec(desired).containers[0]
}

fn env<'a>(container: &'a Container, name: &str) -> Option<&'a EnvVar> {
    container
        .env
        .as_ref()
        .unwrap()
        .iter()
        .find(|var| var.name == name)
}

fn env_value(container: &Container, name: &str) -> String {
    env(container, name)
        .and_then(|var| var.value.clone())
        .unwrap_or_else(|| panic!("no literal env {name}"))
}

fn env_secret(container: &Container, name: &str) -> (String, String) {
    let selector = env(container, name)
        .and_then(|var| var.value_from.as_ref())
        .and_then(|from| from.secret_key_ref.as_ref())
        .unwrap_or_else(|| panic!("env {name} is not from a Secret"));
    (selector.name.clone(), selector.key.clone())
}

#[test]
fn routes_configmap_holds_the_compiled_routes_file() {
    let chat = common::chat(NS);
    let routes = common::routes(NS);
    let desired = desired(&chat, &routes, Capabilities::CURRENT);
    assert_eq!(desired.routes.metadata.name.as_deref(), Some("demo-routes"));
    let data = desired.routes.data.as_ref().unwrap();
    assert_eq!(data.keys().collect::<Vec<_>>(), ["routes.yaml"]);
    let file = RoutesFile::from_yaml(&data["routes.yaml"]).unwrap();
    file.validate().unwrap();
    assert_eq!(file.default_alias(), "default");
    let aliases: Vec<&str> = file.routes.iter().map(|r| r.alias.as_str()).collect();
    assert_eq!(aliases, ["default", "fast"]);
    let chain: Vec<&str> = file
        .route("default")
        .unwrap()
        .providers()
        .map(|p| p.as_str())
        .collect();
    assert_eq!(chain, ["bedrock", "openai", "simulated"]);
    let fast = &file.route("fast").unwrap().targets[0];
    assert_eq!(
        fast.pricing.input_per_1k,
        Credits::parse_decimal("0.25").unwrap()
    );
    assert_eq!(file.routes[0], routes[0].spec);
    // The service trims prompts with these, so they must reach it.
    let default = file.route("default").unwrap();
    assert_eq!(
        default.system_prompt.as_deref(),
        Some("You are a helpful assistant. Answer concisely.")
    );
    let windows: Vec<Option<u32>> = default.targets.iter().map(|t| t.context_tokens).collect();
    assert_eq!(windows, [Some(128_000), Some(32_768), None]);
}

#[test]
fn every_child_is_owned_by_the_chat_deployment() {
    let chat = common::chat(NS);
    let desired = desired(&chat, &common::routes(NS), Capabilities::CURRENT);
    let metas = [
        &desired.service_account.metadata,
        &desired.role.metadata,
        &desired.role_binding.metadata,
        &desired.routes.metadata,
        &desired.service.metadata,
        &desired.deployment.metadata,
        &desired.autoscaler.as_ref().unwrap().metadata,
        &desired.disruption_budget.as_ref().unwrap().metadata,
        &desired.service_monitor.as_ref().unwrap().metadata,
    ];
    for meta in metas {
        assert_eq!(meta.namespace.as_deref(), Some(NS));
        let owners = meta.owner_references.as_ref().unwrap();
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0].kind, "ChatDeployment");
        assert_eq!(owners[0].name, "demo");
        assert_eq!(owners[0].uid, chat.metadata.uid.clone().unwrap());
        assert_eq!(owners[0].controller, Some(true));
        let labels = meta.labels.as_ref().unwrap();
        assert_eq!(labels["app.kubernetes.io/managed-by"], "parley-operator");
        assert_eq!(labels["app.kubernetes.io/instance"], "demo");
    }
}

#[test]
fn deployment_runs_the_service_safely() {
    let chat = common::chat(NS);
    let desired = desired(&chat, &common::routes(NS), Capabilities::CURRENT);
    let pod = pod_spec(&desired);
    let container = container(&desired);
    assert_eq!(
        container.image.as_deref(),
        Some(parley_crds::DEFAULT_SERVICE_IMAGE)
    );
    // The grace period covers the longest stream (300 s) plus the drain margin.
    assert_eq!(pod.termination_grace_period_seconds, Some(330));
    let pre_stop = container
        .lifecycle
        .as_ref()
        .unwrap()
        .pre_stop
        .as_ref()
        .unwrap();
    assert_eq!(pre_stop.sleep.as_ref().unwrap().seconds, 5);
    let liveness = container
        .liveness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    let readiness = container
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(liveness.path.as_deref(), Some("/health"));
    assert_eq!(readiness.path.as_deref(), Some("/ready"));
    let security = container.security_context.as_ref().unwrap();
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.run_as_non_root, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(
        pod.security_context.as_ref().unwrap().run_as_non_root,
        Some(true)
    );
    assert_eq!(pod.service_account_name.as_deref(), Some("demo"));
    let anti = pod
        .affinity
        .as_ref()
        .unwrap()
        .pod_anti_affinity
        .as_ref()
        .unwrap();
    let term = &anti
        .preferred_during_scheduling_ignored_during_execution
        .as_ref()
        .unwrap()[0];
    assert_eq!(
        term.pod_affinity_term.topology_key,
        "kubernetes.io/hostname"
    );
    // Routes come from watching the ConfigMap, not from a mounted file: the
    // service refuses both at once.
    assert!(env(container, "PARLEY_ROUTES_FILE").is_none());
    let volumes: Vec<&str> = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .map(|v| v.name.as_str())
        .collect();
    assert_eq!(volumes, ["data", "tmp"]);
    // Shutdown lets replies run for the longest stream, then stores them
    // within the pod's grace period (330 s, of which the preStop sleep takes 5).
    assert_eq!(env_value(container, "PARLEY_STREAM_DRAIN_SECONDS"), "300");
    assert_eq!(env_value(container, "PARLEY_SHUTDOWN_DRAIN_SECONDS"), "315");
    // With an autoscaler, the Deployment leaves the replica count to it.
    assert_eq!(desired.deployment.spec.as_ref().unwrap().replicas, None);
}

#[test]
fn deployment_environment_follows_the_interface_contract() {
    let chat = common::chat(NS);
    let desired = desired(&chat, &common::routes(NS), Capabilities::CURRENT);
    let container = container(&desired);
    assert_eq!(env_value(container, "PARLEY_LISTEN"), "0.0.0.0:8080");
    assert_eq!(
        env_value(container, "PARLEY_ROUTES_CONFIGMAP"),
        "demo-routes"
    );
    let namespace = env(container, "POD_NAMESPACE")
        .unwrap()
        .value_from
        .as_ref()
        .unwrap();
    assert_eq!(
        namespace.field_ref.as_ref().unwrap().field_path,
        "metadata.namespace"
    );
    assert_eq!(
        env_secret(container, "PARLEY_MONGODB_URI"),
        ("parley-mongodb".into(), "uri".into())
    );
    assert_eq!(env_value(container, "PARLEY_MONGODB_DATABASE"), "parley");
    assert_eq!(
        env_secret(container, "PARLEY_REDIS_URL"),
        ("parley-redis".into(), "url".into())
    );
    assert_eq!(
        env_secret(container, "PARLEY_JWT_SECRET"),
        ("parley-jwt".into(), "secret".into())
    );
    assert_eq!(
        env_value(container, "PARLEY_JWT_ISSUER"),
        "https://auth.example.edu"
    );
    assert_eq!(env_value(container, "PARLEY_JWT_AUDIENCE"), "parley");
    assert!(env(container, "PARLEY_JWKS_URL").is_none());
    assert_eq!(env_value(container, "PARLEY_INITIAL_CREDITS"), "100");
    assert_eq!(env_value(container, "AWS_REGION"), "eu-west-1");
    assert!(
        env(container, "AWS_ACCESS_KEY_ID").is_none(),
        "IRSA: no static keys"
    );
    assert_eq!(
        env_value(container, "PARLEY_OPENAI_BASE_URL"),
        "http://vllm.models.svc:8000/v1"
    );
    assert_eq!(
        env_secret(container, "PARLEY_OPENAI_API_KEY"),
        ("parley-openai".into(), "api-key".into())
    );
    assert_eq!(
        env_value(container, "PARLEY_RATE_LIMIT_REQUESTS_PER_MINUTE"),
        "30"
    );
    assert_eq!(
        env_value(container, "PARLEY_RATE_LIMIT_TOKENS_PER_MINUTE"),
        "50000"
    );
    assert_eq!(
        env_value(container, "PARLEY_RATE_LIMIT_CONCURRENT_STREAMS"),
        "2"
    );
    assert_eq!(env_value(container, "PARLEY_REATTACH_GRACE_SECONDS"), "30");
    assert_eq!(env_value(container, "PARLEY_OBSERVATION"), "on");
    assert_eq!(env_value(container, "PARLEY_MAX_STREAM_SECONDS"), "300");
    let annotations = desired
        .service_account
        .metadata
        .annotations
        .as_ref()
        .unwrap();
    assert_eq!(
        annotations["eks.amazonaws.com/role-arn"],
        "arn:aws:iam::123456789012:role/parley-bedrock"
    );
    let rules = desired.role.rules.as_ref().unwrap();
    assert_eq!(rules[0].resource_names.as_ref().unwrap(), &["demo-routes"]);
    assert_eq!(rules[0].verbs, ["get", "list", "watch"]);
}

#[test]
fn observation_and_the_longest_reply_reach_the_pods() {
    let mut chat = common::chat(NS);
    chat.spec.observation.enabled = false;
    chat.spec.max_stream_duration_seconds = 90;
    let desired = desired(&chat, &common::routes(NS), Capabilities::CURRENT);
    let container = container(&desired);
    assert_eq!(env_value(container, "PARLEY_OBSERVATION"), "off");
    assert_eq!(env_value(container, "PARLEY_MAX_STREAM_SECONDS"), "90");
    assert_eq!(env_value(container, "PARLEY_STREAM_DRAIN_SECONDS"), "90");
}

#[test]
fn autoscaler_budget_service_and_monitor() {
    let chat = common::chat(NS);
    let desired = desired(&chat, &common::routes(NS), Capabilities::CURRENT);
    let hpa = desired.autoscaler.as_ref().unwrap().spec.as_ref().unwrap();
    assert_eq!((hpa.min_replicas, hpa.max_replicas), (Some(2), 10));
    assert_eq!(hpa.scale_target_ref.kind, "Deployment");
    assert_eq!(hpa.scale_target_ref.name, "demo");
    let metrics = hpa.metrics.as_ref().unwrap();
    let cpu = metrics[0].resource.as_ref().unwrap();
    assert_eq!(
        (cpu.name.as_str(), cpu.target.average_utilization),
        ("cpu", Some(70))
    );
    let streams = metrics[1].pods.as_ref().unwrap();
    assert_eq!(streams.metric.name, "parley_active_streams");
    assert_eq!(streams.target.average_value.as_ref().unwrap().0, "50");
    let pdb = desired
        .disruption_budget
        .as_ref()
        .unwrap()
        .spec
        .as_ref()
        .unwrap();
    assert_eq!(
        pdb.max_unavailable,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
    );
    let service = desired.service.spec.as_ref().unwrap();
    let ports: Vec<(&str, i32)> = service
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .map(|p| (p.name.as_deref().unwrap(), p.port))
        .collect();
    assert_eq!(ports, [("http", 80), ("metrics", 9090)]);
    let monitor = desired.service_monitor.as_ref().unwrap();
    assert_eq!(monitor.types.as_ref().unwrap().kind, "ServiceMonitor");
    assert_eq!(monitor.data["spec"]["endpoints"][0]["port"], "metrics");
}

#[test]
fn an_old_cluster_gets_no_autoscaler_budget_monitor_or_sleep_hook() {
    let old = Capabilities {
        autoscaling_v2: false,
        policy_v1: false,
        service_monitor: false,
        pre_stop_sleep: false,
    };
    let chat = common::chat(NS);
    let desired = desired(&chat, &common::routes(NS), old);
    assert!(desired.autoscaler.is_none());
    assert!(desired.disruption_budget.is_none());
    assert!(desired.service_monitor.is_none());
    assert!(container(&desired).lifecycle.is_none());
    // Without an autoscaler the Deployment runs the minimum.
    assert_eq!(desired.deployment.spec.as_ref().unwrap().replicas, Some(2));
}

#[test]
fn a_route_change_touches_only_the_configmap() {
    let chat = common::chat(NS);
    let routes = common::routes(NS);
    let before = desired(&chat, &routes, Capabilities::CURRENT);
    let mut edited = routes.clone();
    edited[1].spec.targets[0].max_output_tokens = 128;
    let after = desired(&chat, &edited, Capabilities::CURRENT);
    assert_ne!(before.routes, after.routes);
    assert_eq!(
        before.deployment, after.deployment,
        "a route edit must not roll pods"
    );
    assert_eq!(
        (
            &before.service,
            &before.service_account,
            &before.autoscaler,
            &before.disruption_budget
        ),
        (
            &after.service,
            &after.service_account,
            &after.autoscaler,
            &after.disruption_budget
        )
    );

    // Anything else in the spec rolls the Deployment.
    let mut rolled = chat.clone();
    rolled.spec.rate_limits.requests_per_minute = 5;
    let after = desired(&rolled, &routes, Capabilities::CURRENT);
    assert_ne!(before.deployment, after.deployment);
    assert_eq!(before.routes, after.routes);
}

#[test]
fn duplicate_and_invalid_routes_are_left_out_with_reasons() {
    let chat = common::chat(NS);
    let mut routes = common::routes(NS);
    let mut duplicate = routes[0].clone();
    duplicate.metadata.name = Some("default-copy".into());
    duplicate.metadata.creation_timestamp = Some(common::created_at(5));
    let mut negative = routes[1].clone();
    negative.metadata.name = Some("negative".into());
    negative.spec.alias = "cheap".into();
    negative.spec.targets[0].pricing.output_per_1k = Credits::from_whole(-1);
    routes.push(duplicate);
    routes.push(negative);
    let compiled = compiled(&chat, &routes);
    let served: Vec<&str> = compiled
        .resolved
        .iter()
        .map(|r| r.model_route.as_str())
        .collect();
    assert_eq!(
        served,
        ["default", "fast"],
        "the older `default` keeps its alias"
    );
    let rejected: Vec<(&str, &str)> = compiled
        .rejected
        .iter()
        .map(|r| (r.name.as_str(), r.rejection.reason))
        .collect();
    assert_eq!(
        rejected,
        [
            ("default-copy", "DuplicateAlias"),
            ("negative", ProblemKind::NegativePrice.reason())
        ]
    );
    let problems = route_problems(&chat.spec, &compiled);
    assert_eq!(problems.len(), 2);
    assert!(
        problems[0].message.contains("ModelRoute default-copy"),
        "{}",
        problems[0].message
    );
}

#[test]
fn invalid_specs_become_problems() {
    let mut chat = common::chat(NS);
    assert_eq!(spec_problems(&chat.spec), []);
    chat.spec.replicas.min = 5;
    chat.spec.replicas.max = 3;
    chat.spec.redis = None;
    chat.spec.storage = StorageSpec {
        mongodb: None,
        embedded: Some(EmbeddedStorage::default()),
    };
    chat.spec.auth.jwt_secret_ref = None;
    chat.spec.cohort_policies[0].rules[0].pattern = Some("(unclosed".into());
    let problems = spec_problems(&chat.spec);
    let reasons: Vec<&str> = problems.iter().map(|p| p.reason).collect();
    assert_eq!(
        reasons,
        [
            "ReplicasMinAboveMax",
            "RedisRequired",
            "EmbeddedStorageSingleReplica",
            "InvalidCohortPolicy",
            "AuthNotConfigured"
        ]
    );
    assert!(
        problems[3]
            .message
            .starts_with("cohortPolicies[0].rules[0]: invalid regular expression"),
        "{}",
        problems[3].message
    );
}

#[test]
fn cohort_policies_and_route_policies_reach_the_routes_file() {
    let chat = common::chat(NS);
    let served = compiled(&chat, &common::routes(NS));
    assert_eq!(served.file.cohort_policies, chat.spec.cohort_policies);
    let default = served.file.route("default").unwrap();
    assert_eq!(default.capabilities, ["chat", "writing", "code"]);
    assert_eq!(default.content_policy.as_ref().unwrap().rules.len(), 3);
    assert_eq!(
        default.targets[0].guardrail_identifier.as_deref(),
        Some("school-guardrail")
    );
    served.file.validate().unwrap();

    // A route whose pattern does not compile is not accepted, with the reason.
    let mut routes = common::routes(NS);
    routes[1].spec.content_policy = Some(parley_crds::ContentPolicy {
        rules: vec![parley_crds::ContentRule {
            name: "broken".into(),
            action: parley_crds::RuleAction::Block,
            direction: parley_crds::RuleDirection::Both,
            words: Vec::new(),
            pattern: Some("[z-a]".into()),
            max_length: None,
            reason: None,
        }],
    });
    let rejecting = compiled(&chat, &routes);
    assert_eq!(rejecting.rejected.len(), 1);
    let rejection = &rejecting.rejected[0].rejection;
    assert_eq!(rejection.reason, "InvalidPattern");
    assert!(
        rejection
            .message
            .contains("spec.contentPolicy.rules[0]: invalid regular expression"),
        "{}",
        rejection.message
    );
}

#[test]
fn status_reports_actionable_conditions_and_is_stable() {
    let chat = common::chat(NS);
    let routes = common::routes(NS);
    let compiled = compiled(&chat, &routes);
    let observation = Observation {
        generation: Some(1),
        min_replicas: 2,
        spec_problems: &[],
        route_problems: &[],
        routes: &compiled,
        rollout: Some(Rollout {
            ready_replicas: 1,
            complete: false,
        }),
        capabilities: Capabilities {
            service_monitor: false,
            ..Capabilities::CURRENT
        },
    };
    let first = chat_status(&observation, None, &common::created_at(0));
    // The status says which optional children are off and why.
    let off: Vec<(&str, &str)> = first
        .off_children
        .iter()
        .map(|child| (child.kind.as_str(), child.reason.as_str()))
        .collect();
    assert_eq!(off, [("ServiceMonitor", "ApiNotServed")]);
    assert!(first.off_children[0].message.contains("without a restart"));
    let get = |type_: &str| first.conditions.iter().find(|c| c.type_ == type_).unwrap();
    assert_eq!(
        (get("Ready").status.as_str(), get("Ready").reason.as_str()),
        ("False", "ReplicasNotReady")
    );
    assert_eq!(get("Ready").message, "1 of at least 2 replicas ready");
    assert_eq!(get("Progressing").status, "True");
    assert_eq!(get("Degraded").status, "False");
    assert_eq!(get("RoutesValid").status, "True");
    assert_eq!(first.observed_generation, Some(1));
    let aliases: Vec<&str> = first.routes.iter().map(|r| r.alias.as_str()).collect();
    assert_eq!(aliases, ["default", "fast"]);
    // Same world later: identical status, so the controller writes nothing.
    let again = chat_status(&observation, Some(&first), &common::created_at(9));
    assert_eq!(again, first);

    let problems = spec_problems(&{
        let mut spec = chat.spec.clone();
        spec.redis = None;
        spec
    });
    let invalid = Observation {
        spec_problems: &problems,
        rollout: None,
        ..observation
    };
    let status = chat_status(&invalid, Some(&first), &common::created_at(9));
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready.reason, "InvalidSpec");
    assert!(ready.message.contains("spec.redis"), "{}", ready.message);
    let degraded = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap();
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "RedisRequired")
    );
    assert_eq!(degraded.last_transition_time, common::created_at(9));
}
