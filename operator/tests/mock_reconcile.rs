//! Reconcile against kube's mock client (tower-test): the exact requests
//! sent, including the HPA and PDB that the 1.20 test server cannot serve.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::{Request, Response};
use kube::Client;
use kube::client::Body;
use kube::runtime::controller::Action;
use parley_crds::{ChatDeployment, Credits, ModelRoute};
use parley_operator::Error;
use parley_operator::build::Capabilities;
use parley_operator::controller::{Context, Settings, chat_deployment, model_route};
use parley_operator::metrics::{ControllerLabels, Metrics};
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tower_test::mock::{self, Handle};

const NS: &str = "team-a";

#[derive(Debug, Clone)]
struct Recorded {
    method: String,
    path: String,
    query: String,
    body: Value,
}

impl Recorded {
    fn line(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

/// Answers every request with `respond` until the client is dropped, and
/// returns what was asked.
async fn serve(
    mut handle: Handle<Request<Body>, Response<Body>>,
    respond: impl Fn(&Recorded) -> (u16, Value),
) -> Vec<Recorded> {
    let mut recorded = Vec::new();
    while let Some((request, send)) = handle.next_request().await {
        let method = request.method().to_string();
        let path = request.uri().path().to_owned();
        let query = request.uri().query().unwrap_or_default().to_owned();
        let bytes = request.into_body().collect_bytes().await.unwrap();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        let entry = Recorded {
            method,
            path,
            query,
            body,
        };
        let (code, value) = respond(&entry);
        let response = Response::builder()
            .status(code)
            .body(Body::from(serde_json::to_vec(&value).unwrap()))
            .unwrap();
        send.send_response(response);
        recorded.push(entry);
    }
    recorded
}

fn context(client: Client, capabilities: Capabilities) -> (Arc<Context>, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new(&mut Registry::default()));
    let settings = Settings {
        namespace: Some(NS.to_owned()),
        ..Settings::default()
    };
    let context = Context::new(client, capabilities, metrics.clone(), settings);
    (Arc::new(context), metrics)
}

fn list(kind: &str, items: Value) -> Value {
    json!({"apiVersion": "parley.dev/v1alpha1", "kind": kind, "metadata": {}, "items": items})
}

fn not_found() -> (u16, Value) {
    (
        404,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
               "reason": "NotFound", "code": 404}),
    )
}

/// `object` as the API server creates it for the operator.
fn created(object: &Value) -> Value {
    let mut created = object.clone();
    created["metadata"]["uid"] = json!("5b1d0c3e-0000-4000-8000-0000000000aa");
    created["metadata"]["resourceVersion"] = json!("7");
    created["metadata"]["managedFields"] = json!([{
        "manager": "parley-operator", "operation": "Update",
        "apiVersion": "monitoring.coreos.com/v1", "fieldsType": "FieldsV1",
        "fieldsV1": {"f:spec": {"f:endpoints": {}}},
    }]);
    created
}

/// The API server's answer for a ChatDeployment reconcile: the route list,
/// echoes of applied objects, the ChatDeployment for status writes.
fn chat_api(chat: ChatDeployment, routes: Vec<ModelRoute>) -> impl Fn(&Recorded) -> (u16, Value) {
    move |request| {
        if request.method == "GET" && request.path.ends_with("/modelroutes") {
            (
                200,
                list("ModelRouteList", serde_json::to_value(&routes).unwrap()),
            )
        } else if request.path.ends_with("/servicemonitors/demo") && request.method == "GET" {
            not_found()
        } else if request.path.ends_with("/servicemonitors") && request.method == "POST" {
            (201, created(&request.body))
        } else if request.path.ends_with("/chatdeployments/demo/status") {
            let mut chat = serde_json::to_value(&chat).unwrap();
            chat["status"] = request.body["status"].clone();
            (200, chat)
        } else {
            (200, request.body.clone())
        }
    }
}

async fn reconcile_chat(
    chat: ChatDeployment,
    routes: Vec<ModelRoute>,
    capabilities: Capabilities,
) -> (Result<Action, Error>, Vec<Recorded>) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let server = tokio::spawn(serve(handle, chat_api(chat.clone(), routes)));
    let (context, _) = context(Client::new(service, NS), capabilities);
    let result = chat_deployment::reconcile(Arc::new(chat), context).await;
    (result, server.await.unwrap())
}

/// The applied children, then the ServiceMonitor: read, found missing,
/// created, and its fields handed from the create to the operator's apply.
const CHILDREN: [&str; 11] = [
    "PATCH /api/v1/namespaces/team-a/serviceaccounts/demo",
    "PATCH /apis/rbac.authorization.k8s.io/v1/namespaces/team-a/roles/demo",
    "PATCH /apis/rbac.authorization.k8s.io/v1/namespaces/team-a/rolebindings/demo",
    "PATCH /api/v1/namespaces/team-a/configmaps/demo-routes",
    "PATCH /api/v1/namespaces/team-a/services/demo",
    "PATCH /apis/apps/v1/namespaces/team-a/deployments/demo",
    "PATCH /apis/autoscaling/v2/namespaces/team-a/horizontalpodautoscalers/demo",
    "PATCH /apis/policy/v1/namespaces/team-a/poddisruptionbudgets/demo",
    MONITOR,
    MONITOR_CREATE,
    MONITOR_PATCH,
];
const MONITOR: &str = "GET /apis/monitoring.coreos.com/v1/namespaces/team-a/servicemonitors/demo";
const MONITOR_CREATE: &str =
    "POST /apis/monitoring.coreos.com/v1/namespaces/team-a/servicemonitors";
const MONITOR_PATCH: &str =
    "PATCH /apis/monitoring.coreos.com/v1/namespaces/team-a/servicemonitors/demo";
const LIST_ROUTES: &str = "GET /apis/parley.dev/v1alpha1/namespaces/team-a/modelroutes";
const CHAT_STATUS: &str =
    "PATCH /apis/parley.dev/v1alpha1/namespaces/team-a/chatdeployments/demo/status";
const EVENTS: &str = "POST /apis/events.k8s.io/v1/namespaces/team-a/events";

fn lines(recorded: &[Recorded]) -> Vec<String> {
    recorded.iter().map(Recorded::line).collect()
}

#[tokio::test]
async fn create_applies_every_child_then_writes_status_once() {
    let chat = common::chat(NS);
    let (result, recorded) = reconcile_chat(chat, common::routes(NS), Capabilities::CURRENT).await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(300)));
    let mut expected = vec![LIST_ROUTES.to_owned()];
    expected.extend(CHILDREN.map(String::from));
    expected.push(CHAT_STATUS.to_owned());
    expected.extend(std::iter::repeat_n(EVENTS.to_owned(), 4));
    assert_eq!(lines(&recorded), expected);

    assert!(
        recorded[0]
            .query
            .contains("labelSelector=parley.dev%2Fchat%3Ddemo"),
        "{}",
        recorded[0].query
    );
    for applied in &recorded[1..=8] {
        assert!(
            applied.query.contains("fieldManager=parley-operator"),
            "{}",
            applied.query
        );
        assert!(applied.query.contains("force=true"), "{}", applied.query);
    }
    let hpa = &recorded[7].body;
    assert_eq!(hpa["apiVersion"], "autoscaling/v2");
    assert_eq!(hpa["spec"]["minReplicas"], 2);
    assert_eq!(hpa["spec"]["maxReplicas"], 10);
    assert_eq!(
        hpa["metadata"]["ownerReferences"][0]["kind"],
        "ChatDeployment"
    );
    let pdb = &recorded[8].body;
    assert_eq!(pdb["apiVersion"], "policy/v1");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    let routes_yaml = recorded[4].body["data"]["routes.yaml"].as_str().unwrap();
    assert!(routes_yaml.contains("alias: fast"), "{routes_yaml}");
    let create = &recorded[10];
    assert!(
        create.query.contains("fieldManager=parley-operator"),
        "{}",
        create.query
    );
    assert_eq!(create.body["spec"]["endpoints"][0]["port"], "metrics");
    let handed_over = &recorded[11];
    assert_eq!(handed_over.body["metadata"]["resourceVersion"], "7");
    assert_eq!(
        handed_over.body["metadata"]["managedFields"][0]["operation"],
        "Apply"
    );
    let status = &recorded[12].body["status"];
    assert_eq!(status["observedGeneration"], 1);
    assert_eq!(status["routes"][0]["alias"], "default");
    let types: Vec<&str> = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["RoutesValid", "Ready", "Progressing", "Degraded"]);
}

#[tokio::test]
async fn unchanged_status_is_not_written_again() {
    let chat = common::chat(NS);
    let routes = common::routes(NS);
    let (_, first) = reconcile_chat(chat.clone(), routes.clone(), Capabilities::CURRENT).await;
    let written = first.iter().find(|r| r.line() == CHAT_STATUS).unwrap();
    let mut settled = chat;
    settled.status = Some(serde_json::from_value(written.body["status"].clone()).unwrap());
    let (result, recorded) = reconcile_chat(settled, routes, Capabilities::CURRENT).await;
    result.unwrap();
    let mut expected = vec![LIST_ROUTES.to_owned()];
    expected.extend(CHILDREN.map(String::from));
    assert_eq!(lines(&recorded), expected, "no status write, no events");
}

#[tokio::test]
async fn an_old_cluster_gets_neither_autoscaler_nor_budget() {
    let old = Capabilities {
        autoscaling_v2: false,
        policy_v1: false,
        service_monitor: false,
        pre_stop_sleep: false,
    };
    let (result, recorded) = reconcile_chat(common::chat(NS), common::routes(NS), old).await;
    result.unwrap();
    let paths = lines(&recorded);
    assert!(!paths.iter().any(|p| p.contains("horizontalpodautoscalers")));
    assert!(!paths.iter().any(|p| p.contains("poddisruptionbudgets")));
    assert!(!paths.iter().any(|p| p.contains("servicemonitors")));
    assert_eq!(recorded[6].body["spec"]["replicas"], 2);
}

/// Reconciles the example with every capability, the API server answering
/// the ServiceMonitor's requests with `monitor` and the rest as usual.
async fn reconcile_with_monitor(
    monitor: impl Fn(&Recorded) -> (u16, Value) + Send + 'static,
) -> (Result<Action, Error>, Vec<Recorded>) {
    let chat = common::chat(NS);
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let usual = chat_api(chat.clone(), common::routes(NS));
    let server = tokio::spawn(serve(handle, move |request| {
        if request.path.contains("/servicemonitors") {
            monitor(request)
        } else {
            usual(request)
        }
    }));
    let (context, _) = context(Client::new(service, NS), Capabilities::CURRENT);
    let result = chat_deployment::reconcile(Arc::new(chat), context).await;
    (result, server.await.unwrap())
}

fn monitor_requests(recorded: &[Recorded]) -> Vec<&Recorded> {
    recorded
        .iter()
        .filter(|r| r.path.contains("/servicemonitors"))
        .collect()
}

#[tokio::test]
async fn an_existing_monitor_is_applied_on_condition_of_its_uid() {
    let (result, recorded) = reconcile_with_monitor(|request| match request.method.as_str() {
        "GET" => {
            let mut live = created(&json!({"apiVersion": "monitoring.coreos.com/v1",
                "kind": "ServiceMonitor", "metadata": {"name": "demo", "namespace": NS}}));
            live["metadata"]["managedFields"][0]["operation"] = json!("Apply");
            (200, live)
        }
        _ => (200, request.body.clone()),
    })
    .await;
    result.unwrap();
    let monitor = monitor_requests(&recorded);
    let lines: Vec<String> = monitor.iter().map(|r| r.line()).collect();
    assert_eq!(
        lines,
        [MONITOR, MONITOR_PATCH],
        "read, then applied; no create"
    );
    let apply = monitor[1];
    assert!(
        apply.query.contains("fieldManager=parley-operator"),
        "{}",
        apply.query
    );
    assert!(apply.query.contains("force=true"), "{}", apply.query);
    assert_eq!(
        apply.body["metadata"]["uid"],
        "5b1d0c3e-0000-4000-8000-0000000000aa"
    );
    assert_eq!(apply.body["spec"]["endpoints"][0]["port"], "metrics");
}

#[tokio::test]
async fn a_monitor_is_not_created_while_its_crd_is_being_deleted() {
    let (result, recorded) = reconcile_with_monitor(|request| match request.method.as_str() {
        "GET" => not_found(),
        _ => (
            405,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                   "message": "create not allowed while custom resource definition is terminating",
                   "reason": "MethodNotAllowed", "code": 405}),
        ),
    })
    .await;
    assert_eq!(result.unwrap(), Action::requeue(Duration::from_secs(300)));
    let monitor: Vec<String> = monitor_requests(&recorded)
        .iter()
        .map(|r| r.line())
        .collect();
    assert_eq!(
        monitor,
        [MONITOR, MONITOR_CREATE],
        "no apply after the refused create"
    );
    assert!(lines(&recorded).contains(&CHAT_STATUS.to_owned()));
}

#[tokio::test]
async fn an_invalid_spec_applies_nothing_and_says_why() {
    let mut chat = common::chat(NS);
    chat.spec.redis = None;
    let (result, recorded) = reconcile_chat(chat, common::routes(NS), Capabilities::CURRENT).await;
    result.unwrap();
    let paths = lines(&recorded);
    assert_eq!(paths[..2], [LIST_ROUTES.to_owned(), CHAT_STATUS.to_owned()]);
    assert!(paths[2..].iter().all(|p| p == EVENTS), "{paths:?}");
    let conditions = recorded[1].body["status"]["conditions"].as_array().unwrap();
    let ready = conditions.iter().find(|c| c["type"] == "Ready").unwrap();
    assert_eq!(ready["status"], "False");
    assert_eq!(ready["reason"], "InvalidSpec");
    let degraded = conditions.iter().find(|c| c["type"] == "Degraded").unwrap();
    assert_eq!(degraded["reason"], "RedisRequired");
    let event = recorded
        .iter()
        .find(|r| r.body["reason"] == "RedisRequired")
        .unwrap();
    assert_eq!(event.body["type"], "Warning");
}

#[tokio::test]
async fn a_failed_apply_is_an_error_counted_by_kind() {
    let chat = common::chat(NS);
    let routes = common::routes(NS);
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let ok = chat_api(chat.clone(), routes);
    let server = tokio::spawn(serve(handle, move |request| {
        if request.path.ends_with("/deployments/demo") {
            (
                500,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                         "message": "etcd unavailable", "reason": "InternalError", "code": 500}),
            )
        } else {
            ok(request)
        }
    }));
    let (context, metrics) = context(Client::new(service, NS), Capabilities::CURRENT);
    let error = chat_deployment::reconcile(Arc::new(chat.clone()), context.clone())
        .await
        .unwrap_err();
    assert_eq!(error.kind(), "api_server");
    // Retries of the same object back off exponentially from the kind's base.
    let chat = Arc::new(chat);
    for seconds in [10, 20, 40] {
        let action = chat_deployment::error_policy(chat.clone(), &error, context.clone());
        assert_eq!(action, Action::requeue(Duration::from_secs(seconds)));
    }
    let failures = metrics
        .reconcile_failures
        .get_or_create(&parley_operator::metrics::FailureLabels {
            controller: "chatdeployment",
            reason: "api_server",
        })
        .get();
    assert_eq!(failures, 1);
    drop(context);
    let recorded = server.await.unwrap();
    assert!(
        !lines(&recorded).contains(&CHAT_STATUS.to_owned()),
        "no status after a failure"
    );
}

#[tokio::test]
async fn a_change_is_pending_from_its_failure_until_it_converges_and_both_are_exported() {
    let chat = common::chat(NS);
    let routes = common::routes(NS);
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let ok = chat_api(chat.clone(), routes);
    let etcd_down = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let down = etcd_down.clone();
    let server = tokio::spawn(serve(handle, move |request| {
        if request.path.ends_with("/deployments/demo") && down.load(Ordering::SeqCst) {
            (
                500,
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                         "message": "etcd unavailable", "reason": "InternalError", "code": 500}),
            )
        } else {
            ok(request)
        }
    }));
    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::new(&mut registry));
    let settings = Settings {
        namespace: Some(NS.to_owned()),
        ..Settings::default()
    };
    let context = Arc::new(Context::new(
        Client::new(service, NS),
        Capabilities::CURRENT,
        metrics.clone(),
        settings,
    ));
    let labels = ControllerLabels {
        controller: "chatdeployment",
    };
    let chat = Arc::new(chat);

    chat_deployment::reconcile(chat.clone(), context.clone())
        .await
        .unwrap_err();
    assert_eq!(metrics.pending_objects.get_or_create(&labels).get(), 1);
    // The gap between the failed attempt and the retry (not a wait for anything).
    tokio::time::sleep(Duration::from_millis(50)).await;
    etcd_down.store(false, Ordering::SeqCst);
    chat_deployment::reconcile(chat.clone(), context.clone())
        .await
        .unwrap();
    assert_eq!(metrics.pending_objects.get_or_create(&labels).get(), 0);

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains("parley_operator_pending_objects{controller=\"chatdeployment\"} 0"),
        "{text}"
    );
    let converged =
        "parley_operator_time_to_converge_seconds_count{controller=\"chatdeployment\"} 1";
    assert!(text.contains(converged), "{text}");
    // Timed from the failed attempt, not from the one that succeeded.
    let sum: f64 = text
        .lines()
        .find_map(|line| {
            line.strip_prefix(
                "parley_operator_time_to_converge_seconds_sum{controller=\"chatdeployment\"} ",
            )
        })
        .unwrap()
        .parse()
        .unwrap();
    assert!(sum >= 0.05, "time to converge {sum} s");
    drop(context);
    server.await.unwrap();
}

#[test]
fn backoff_doubles_up_to_a_cap_and_resets() {
    let backoff = parley_operator::controller::Backoff::default();
    let base = Duration::from_secs(10);
    let delays: Vec<u64> = (0..7)
        .map(|_| backoff.next_delay("a", base).as_secs())
        .collect();
    assert_eq!(delays, [10, 20, 40, 80, 160, 300, 300]);
    assert_eq!(
        backoff.next_delay("b", base).as_secs(),
        10,
        "counted per object"
    );
    backoff.reset("a");
    assert_eq!(backoff.next_delay("a", base).as_secs(), 10);
    let slow = Duration::from_secs(600);
    assert_eq!(
        backoff.next_delay("c", slow),
        slow,
        "a longer base is not cut"
    );
}

#[test]
fn error_policy_backs_off_by_kind() {
    let api = |code: u16| {
        Error::Kube(kube::Error::Api(Box::new(kube::core::Status {
            code,
            ..kube::core::Status::default()
        })))
    };
    assert_eq!(api(409).retry_after(), Duration::from_secs(1));
    assert_eq!(api(429).retry_after(), Duration::from_secs(10));
    assert_eq!(api(503).retry_after(), Duration::from_secs(10));
    assert_eq!(api(403).retry_after(), Duration::from_secs(60));
    assert_eq!(api(422).retry_after(), Duration::from_secs(300));
    assert_eq!(api(422).kind(), "invalid");
}

/// The API server's answer for a ModelRoute reconcile.
fn route_api(
    chats: Vec<ChatDeployment>,
    routes: Vec<ModelRoute>,
) -> impl Fn(&Recorded) -> (u16, Value) {
    move |request| {
        if request.method == "GET" && request.path.ends_with("/chatdeployments") {
            (
                200,
                list("ChatDeploymentList", serde_json::to_value(&chats).unwrap()),
            )
        } else if request.method == "GET" && request.path.ends_with("/modelroutes") {
            (
                200,
                list("ModelRouteList", serde_json::to_value(&routes).unwrap()),
            )
        } else if request.path.ends_with("/status") {
            let name = request.path.rsplit('/').nth(1).unwrap();
            let route = routes
                .iter()
                .find(|r| r.metadata.name.as_deref() == Some(name))
                .unwrap();
            let mut route = serde_json::to_value(route).unwrap();
            route["status"] = request.body["status"].clone();
            (200, route)
        } else {
            (200, request.body.clone())
        }
    }
}

async fn reconcile_route(
    route: &ModelRoute,
    chats: Vec<ChatDeployment>,
    routes: Vec<ModelRoute>,
) -> Vec<Recorded> {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let server = tokio::spawn(serve(handle, route_api(chats, routes)));
    let (context, _) = context(Client::new(service, NS), Capabilities::CURRENT);
    let action = model_route::reconcile(Arc::new(route.clone()), context)
        .await
        .unwrap();
    assert_eq!(action, Action::await_change());
    server.await.unwrap()
}

#[tokio::test]
async fn model_route_accepted_condition_is_written_only_when_it_changes() {
    let chats = vec![common::chat(NS)];
    let mut routes = common::routes(NS);
    routes[1].spec.targets[0].pricing.input_per_1k = Credits::from_whole(-2);
    let invalid = routes[1].clone();
    let recorded = reconcile_route(&invalid, chats.clone(), routes.clone()).await;
    assert_eq!(
        lines(&recorded),
        [
            "GET /apis/parley.dev/v1alpha1/namespaces/team-a/chatdeployments",
            "GET /apis/parley.dev/v1alpha1/namespaces/team-a/modelroutes",
            "PATCH /apis/parley.dev/v1alpha1/namespaces/team-a/modelroutes/fast/status",
            EVENTS,
        ]
    );
    let condition = &recorded[2].body["status"]["conditions"][0];
    assert_eq!(condition["type"], "Accepted");
    assert_eq!(condition["status"], "False");
    assert_eq!(condition["reason"], "NegativePrice");
    assert_eq!(recorded[2].body["status"]["observedGeneration"], 1);
    assert!(
        condition["message"]
            .as_str()
            .unwrap()
            .contains("inputPer1k")
    );

    let mut settled = invalid;
    settled.status = Some(serde_json::from_value(recorded[2].body["status"].clone()).unwrap());
    routes[1] = settled.clone();
    let recorded = reconcile_route(&settled, chats, routes).await;
    assert_eq!(
        recorded.len(),
        2,
        "only the two lists: {:?}",
        lines(&recorded)
    );
}

#[tokio::test]
async fn a_later_route_with_a_taken_alias_is_rejected() {
    let chats = vec![common::chat(NS)];
    let mut routes = common::routes(NS);
    let mut copy = routes[0].clone();
    copy.metadata.name = Some("default-copy".into());
    copy.metadata.creation_timestamp = Some(common::created_at(7));
    routes.push(copy.clone());
    let recorded = reconcile_route(&copy, chats.clone(), routes.clone()).await;
    let condition = &recorded[2].body["status"]["conditions"][0];
    assert_eq!(condition["reason"], "DuplicateAlias");
    assert!(
        condition["message"]
            .as_str()
            .unwrap()
            .contains("ModelRoute default in ChatDeployment demo")
    );
    // The older route keeps the alias.
    let recorded = reconcile_route(&routes[0], chats, routes.clone()).await;
    assert_eq!(
        recorded[2].body["status"]["conditions"][0]["status"],
        "True"
    );
}
