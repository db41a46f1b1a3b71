//! Parley on a real one-node Kubernetes cluster (scripts/cluster.sh): the
//! charts installed, the operator running as two pods from its image, and a
//! ChatDeployment that becomes pods of the service image answering chat
//! replies, with MongoDB (the host's MongoDB-wire server) and Redis reached
//! through the cluster bridge's gateway address.
//!
//! In order, on one installation:
//! - a first reply through a running pod (timed from the ChatDeployment's
//!   apply);
//! - a ModelRoute edit reaching every pod (timed: each pod's `/api/models`
//!   polled until it shows the edit);
//! - a rollout of the Deployment while 20 replies stream: the pods being
//!   replaced (termination grace and stream drain from the spec's
//!   `maxStreamDurationSeconds`) refuse new replies at once and keep
//!   streaming until their replies end, every one completes with no gap,
//!   clients that leave a terminating pod re-attach on another with
//!   `Last-Event-ID`, nobody is charged twice and every account balances;
//! - the operator's leader stopped dead in the middle of a reconcile: the
//!   other operator pod takes the Lease over and finishes it;
//! - deleting the ChatDeployments: the garbage collector removes every child.
//!
//! There is no kube-proxy, so Services route nothing: the test is its own
//! load balancer. It reaches pods by their IP, sends each new request to a
//! Ready pod, and a client re-attaches to a Ready pod when its pod goes away.
//!
//! Run by scripts/test-cluster.sh, which starts the cluster, loads both
//! images into it and starts the test servers on its bridge;
//! `cargo nextest run` leaves this binary out (.config/nextest.toml).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{apply_all, eventually, install_crds, render};
use eventsource_stream::{Event, Eventsource};
use futures::StreamExt;
use futures::stream::BoxStream;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{
    ConfigMap, Namespace, Pod, ResourceQuota, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, Resource, ResourceExt};
use parley_crds::{ChatDeployment, ModelRoute};
use parley_service::auth::{Principal, Role as UserRole, mint_token};
use parley_test_support::env;
use serde_json::{Value, json};
use tokio::sync::watch;

const RELEASE: &str = "parley";
const OPERATOR_NAMESPACE: &str = "parley-system";
const NAMESPACE: &str = "chat";
const CHAT: &str = "chat";
/// Namespace and name of the ChatDeployment whose reconcile changes leader.
const TAKEOVER: &str = "takeover";
const ROUTE: &str = "default";
const JWT_SECRET: &str = "cluster-test-jwt-secret-0123456789abcdef";
const INITIAL_CREDITS: u64 = 100;
/// The drain a replaced pod gives its replies; its termination grace is 30 s
/// more (the operator's margin).
const MAX_STREAM_SECONDS: u64 = 120;
const ROLLOUT_REPLIES: usize = 20;
/// Words of each rollout reply's prompt: the simulated model echoes them, one
/// event per word at its default 50 a second, so a reply streams for about
/// 30 s, longer than the rollout replaces both pods.
const ROLLOUT_REPLY_WORDS: usize = 1500;
/// Label of every child of a ChatDeployment, set to its name.
const INSTANCE_LABEL: &str = "app.kubernetes.io/instance";
/// Bound of waits for the cluster (pods starting, the garbage collector...).
const WAIT: Duration = Duration::from_secs(120);
/// Bound of the wait for the next event of a streaming reply.
const NEXT_EVENT: Duration = Duration::from_secs(30);

fn log(message: impl std::fmt::Display) {
    println!("[cluster-test] {message}");
}

fn seconds(duration: Duration) -> String {
    format!("{:.2}s", duration.as_secs_f64())
}

/// The tag of both images, as scripts/images.sh tags them.
fn image_tag() -> String {
    std::env::var("PARLEY_IMAGE_TAG")
        .ok()
        .filter(|tag| !tag.is_empty())
        .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_owned())
}

fn token(user: &str) -> String {
    let principal = Principal {
        sub: user.to_owned(),
        role: UserRole::User,
        cohorts: vec!["cluster".to_owned()],
    };
    mint_token(
        JWT_SECRET.as_bytes(),
        &principal,
        Duration::from_secs(3600),
        None,
        None,
    )
    .unwrap()
}

fn http() -> reqwest::Client {
    // Pod IPs are reached directly, never through a proxy of the machine's.
    reqwest::Client::builder().no_proxy().build().unwrap()
}

async fn create_namespace(client: &Client, name: &str) {
    let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .unwrap_or_else(|error| panic!("creating namespace {name}: {error}"));
}

async fn apply<K>(client: &Client, namespace: &str, object: Value) -> K
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + serde::Serialize,
{
    let name = object["metadata"]["name"].as_str().unwrap().to_owned();
    Api::<K>::namespaced(client.clone(), namespace)
        .patch(
            &name,
            &PatchParams::apply(common::FIELD_MANAGER).force(),
            &Patch::Apply(&object),
        )
        .await
        .unwrap_or_else(|error| panic!("applying {} {name}: {error}", K::kind(&())))
}

fn condition_true(
    conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    type_: &str,
) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == type_ && c.status == "True")
}

fn pod_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn pod_base(pod: &Pod) -> String {
    let ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone()).unwrap();
    format!("http://{ip}:8080")
}

/// The pods of ChatDeployment `name` that are Ready and not going away.
async fn ready_pods(client: &Client, namespace: &str, name: &str) -> Vec<Pod> {
    Api::<Pod>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels(&format!("{INSTANCE_LABEL}={name}")))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(pod_ready)
        .collect()
}

/// The host's MongoDB-wire server and Redis as the pods reach them, the
/// token secret, and the route every ChatDeployment of `namespace` serves.
async fn prepare_namespace(client: &Client, namespace: &str) {
    create_namespace(client, namespace).await;
    for (name, key, value) in [
        ("parley-mongodb", "uri", env::mongodb_uri()),
        ("parley-redis", "url", env::redis_url()),
        ("parley-jwt", "secret", JWT_SECRET.to_owned()),
    ] {
        apply::<Secret>(
            client,
            namespace,
            json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": name},
                "stringData": {key: value},
            }),
        )
        .await;
    }
    apply::<ModelRoute>(client, namespace, model_route("simulated-small")).await;
}

fn model_route(model: &str) -> Value {
    json!({
        "apiVersion": "parley.dev/v1alpha1", "kind": "ModelRoute",
        "metadata": {"name": ROUTE, "labels": {"parley.dev/chat": "cluster-test"}},
        "spec": {
            "alias": ROUTE,
            "allowedRoles": ["user", "supervisor", "admin"],
            "targets": [{
                "provider": "simulated",
                "model": model,
                "pricing": {"inputPer1k": 1, "outputPer1k": 2},
                "maxOutputTokens": 4000,
                "timeoutSeconds": 30,
            }],
        },
    })
}

/// A ChatDeployment on the simulated model; `requests_per_minute` reaches
/// the pods as an environment variable, so changing it rolls them.
fn chat_deployment(name: &str, replicas: i32, requests_per_minute: u32) -> Value {
    json!({
        "apiVersion": "parley.dev/v1alpha1", "kind": "ChatDeployment",
        "metadata": {"name": name},
        "spec": {
            "image": format!("ghcr.io/parley-dev/parley-service:{}", image_tag()),
            "replicas": {"min": replicas, "max": replicas},
            "routeSelector": {"matchLabels": {"parley.dev/chat": "cluster-test"}},
            "defaultRoute": ROUTE,
            "storage": {"mongodb": {
                "uriSecretRef": {"name": "parley-mongodb", "key": "uri"},
                "database": format!("{name}_{}", std::process::id()),
            }},
            "redis": {"urlSecretRef": {"name": "parley-redis", "key": "url"}},
            "auth": {"jwtSecretRef": {"name": "parley-jwt", "key": "secret"}},
            "accounting": {"mode": "builtin", "initialCredits": INITIAL_CREDITS},
            "rateLimits": {
                "requestsPerMinute": requests_per_minute,
                "tokensPerMinute": 10_000_000,
                "concurrentStreams": 4,
            },
            "observation": {"enabled": true, "reattachGraceSeconds": 30},
            "maxStreamDurationSeconds": MAX_STREAM_SECONDS,
        },
    })
}

struct Cluster {
    client: Client,
    http: reqwest::Client,
}

impl Cluster {
    async fn connect() -> Self {
        Self {
            client: Client::try_from(env::cluster_kube_config().await).unwrap(),
            http: http(),
        }
    }

    /// Both charts, as `helm install` would install them, with two operator
    /// replicas; returns once both operator pods are Ready and one leads.
    async fn install_charts(&self) {
        install_crds(&self.client).await;
        create_namespace(&self.client, OPERATOR_NAMESPACE).await;
        let tag = image_tag();
        let values = json!({"replicas": 2, "image": {"tag": tag}, "serviceImage": {"tag": tag}});
        let objects = render("parley", RELEASE, OPERATOR_NAMESPACE, &values);
        apply_all(&self.client, &objects).await;
        let deployments: Api<Deployment> = Api::namespaced(self.client.clone(), OPERATOR_NAMESPACE);
        let name = common::one(&objects, "Deployment")["metadata"]["name"]
            .as_str()
            .unwrap()
            .to_owned();
        eventually("both operator pods Ready", WAIT, || async {
            let status = deployments.get(&name).await.ok()?.status?;
            (status.ready_replicas == Some(2)).then_some(())
        })
        .await;
        let leader = self.leader().await;
        log(format!("operator: 2 pods Ready, {leader} leads"));
    }

    /// The operator pod holding the Lease.
    async fn leader(&self) -> String {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), OPERATOR_NAMESPACE);
        eventually("an operator pod holding the Lease", WAIT, || async {
            leases
                .get(parley_operator::leader::LEASE_NAME)
                .await
                .ok()?
                .spec?
                .holder_identity
        })
        .await
    }

    /// Waits until the ChatDeployment reports Ready for its current
    /// generation with its rollout complete, and every pod runs `image`.
    async fn wait_rolled_out(&self, namespace: &str, name: &str, replicas: usize) -> Vec<Pod> {
        let chats: Api<ChatDeployment> = Api::namespaced(self.client.clone(), namespace);
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let image = format!("ghcr.io/parley-dev/parley-service:{}", image_tag());
        eventually(
            &format!("ChatDeployment {name} Ready and rolled out"),
            WAIT,
            || async {
                let chat = chats.get(name).await.ok()?;
                let status = chat.status?;
                let done = status.observed_generation == chat.metadata.generation
                    && condition_true(&status.conditions, "Ready")
                    && !condition_true(&status.conditions, "Progressing");
                if !done {
                    return None;
                }
                let all = pods
                    .list(&ListParams::default().labels(&format!("{INSTANCE_LABEL}={name}")))
                    .await
                    .ok()?
                    .items;
                let running: Vec<Pod> = all.iter().filter(|p| pod_ready(p)).cloned().collect();
                (all.len() == replicas
                    && running.len() == replicas
                    && running.iter().all(|pod| {
                        pod.status
                            .as_ref()
                            .and_then(|s| s.container_statuses.as_ref())
                            .is_some_and(|c| c.iter().all(|c| c.image == image && c.ready))
                    }))
                .then_some(running)
            },
        )
        .await
    }

    async fn session(&self, base: &str, token: &str) -> String {
        let response = self
            .http
            .post(format!("{base}/api/chat/sessions"))
            .bearer_auth(token)
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201, "{:?}", response.text().await);
        let body: Value = response.json().await.unwrap();
        body["sessionId"].as_str().unwrap().to_owned()
    }

    async fn get(&self, base: &str, path: &str, token: &str) -> Value {
        let response = self
            .http
            .get(format!("{base}{path}"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{base}{path}");
        response.json().await.unwrap()
    }

    /// The model `alias` resolves to on the pod at `base`.
    async fn served_model(&self, base: &str, token: &str) -> String {
        let models = self.get(base, "/api/models", token).await;
        let model = models["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["alias"] == ROUTE)
            .unwrap_or_else(|| panic!("{base} serves no route {ROUTE}: {models}"));
        model["model"].as_str().unwrap().to_owned()
    }
}

type Events = BoxStream<'static, Option<Event>>;

/// The events of an SSE response; `None` once the connection failed (the
/// stream then ends), as a cut connection looks to a client.
fn events(response: reqwest::Response) -> Events {
    response
        .bytes_stream()
        .eventsource()
        .map(|event| event.ok())
        .take_while(|event| std::future::ready(event.is_some()))
        .boxed()
}

/// A reply's own events: `(id, name, data)`.
fn numbered(event: &Event) -> (u64, String, Value) {
    (
        event
            .id
            .parse()
            .unwrap_or_else(|_| panic!("event without an id: {event:?}")),
        event.event.clone(),
        serde_json::from_str(&event.data).unwrap(),
    )
}

fn reply_text(events: &[(u64, String, Value)]) -> String {
    events
        .iter()
        .filter(|(_, name, _)| name == "chunk")
        .map(|(_, _, data)| data["text"].as_str().unwrap())
        .collect()
}

/// Streams one reply on `base` to its end.
async fn reply(
    cluster: &Cluster,
    base: &str,
    token: &str,
    session: &str,
    message: &str,
) -> Vec<(u64, String, Value)> {
    let response = cluster
        .http
        .post(format!("{base}/api/chat/sessions/{session}/stream"))
        .bearer_auth(token)
        .json(&json!({"message": message}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{:?}", response.text().await);
    let mut events = events(response);
    let mut seen = Vec::new();
    loop {
        let event = tokio::time::timeout(NEXT_EVENT, events.next())
            .await
            .expect("no event")
            .flatten()
            .expect("the reply's stream was cut");
        let event = numbered(&event);
        let done = event.1 == "complete" || event.1 == "error";
        seen.push(event);
        if done {
            return seen;
        }
    }
}

/// What the test, as a load balancer, knows of the chat pods: which are
/// Ready, which are going away and since when.
#[derive(Debug, Clone, Default)]
struct Board {
    pods: BTreeMap<String, PodSeen>,
}

#[derive(Debug, Clone)]
struct PodSeen {
    base: Option<String>,
    ready: bool,
    terminating_since: Option<Instant>,
    gone_at: Option<Instant>,
}

impl Board {
    fn terminating(&self, pod: &str) -> bool {
        self.pods
            .get(pod)
            .is_some_and(|p| p.terminating_since.is_some())
    }

    /// A Ready pod other than `except`, with its address.
    fn ready_other_than(&self, except: &str) -> Option<(String, String)> {
        self.pods
            .iter()
            .filter(|(name, pod)| {
                name.as_str() != except && pod.ready && pod.terminating_since.is_none()
            })
            .find_map(|(name, pod)| Some((name.clone(), pod.base.clone()?)))
    }
}

/// Keeps `board` up to date from the API server, every 100 ms.
fn watch_pods(
    client: Client,
    namespace: &str,
    name: &str,
) -> (watch::Receiver<Board>, tokio::task::JoinHandle<()>) {
    let (sender, receiver) = watch::channel(Board::default());
    let pods: Api<Pod> = Api::namespaced(client, namespace);
    let selector = format!("{INSTANCE_LABEL}={name}");
    let task = tokio::spawn(async move {
        loop {
            if let Ok(list) = pods.list(&ListParams::default().labels(&selector)).await {
                let now = Instant::now();
                sender.send_modify(|board| {
                    for pod in &list.items {
                        let seen = board.pods.entry(pod.name_any()).or_insert(PodSeen {
                            base: None,
                            ready: false,
                            terminating_since: None,
                            gone_at: None,
                        });
                        seen.ready = pod_ready(pod);
                        if seen.base.is_none()
                            && pod.status.as_ref().is_some_and(|s| s.pod_ip.is_some())
                        {
                            seen.base = Some(pod_base(pod));
                        }
                        if pod.metadata.deletion_timestamp.is_some()
                            && seen.terminating_since.is_none()
                        {
                            seen.terminating_since = Some(now);
                        }
                    }
                    for (name, seen) in &mut board.pods {
                        if seen.gone_at.is_none()
                            && !list.items.iter().any(|p| &p.name_any() == name)
                        {
                            seen.gone_at = Some(now);
                            seen.ready = false;
                        }
                    }
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    (receiver, task)
}

/// One client of the rollout: a user with one session.
struct Client20 {
    user: String,
    token: String,
    session: String,
    prompt: String,
    /// Leaves its pod as soon as the pod starts terminating (as a load
    /// balancer that closes connections to endpoints being removed makes
    /// it), and re-attaches on a Ready pod; the others stay.
    leaves_terminating_pods: bool,
}

#[derive(Debug)]
struct Streamed {
    events: Vec<(u64, String, Value)>,
    /// Every pod the client read from, in order, and why it moved on.
    attached: Vec<(String, &'static str)>,
    ended: Instant,
}

/// Streams `client`'s reply from `pod`, re-attaching with `Last-Event-ID`
/// when the connection is cut or (if it does) when it leaves a terminating pod.
async fn stream_through_rollout(
    http: reqwest::Client,
    client: Client20,
    mut board: watch::Receiver<Board>,
    (mut pod, base): (String, String),
    started: tokio::sync::mpsc::Sender<()>,
) -> Streamed {
    let response = http
        .post(format!(
            "{base}/api/chat/sessions/{}/stream",
            client.session
        ))
        .bearer_auth(&client.token)
        .json(&json!({"message": client.prompt}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        200,
        "{}: {:?}",
        client.user,
        response.text().await
    );
    let mut stream = events(response);
    let mut streamed = Streamed {
        events: Vec::new(),
        attached: vec![(pod.clone(), "posted")],
        ended: Instant::now(),
    };
    let mut announced = false;
    loop {
        let leave = tokio::select! {
            event = tokio::time::timeout(NEXT_EVENT, stream.next()) => {
                match event.unwrap_or_else(|_| panic!("{}: no event within {NEXT_EVENT:?} from {pod}", client.user)).flatten() {
                    Some(event) => {
                        let event = numbered(&event);
                        let done = event.1 == "complete" || event.1 == "error";
                        streamed.events.push(event);
                        if !announced {
                            announced = true;
                            started.send(()).await.unwrap();
                        }
                        if done {
                            streamed.ended = Instant::now();
                            return streamed;
                        }
                        None
                    }
                    None => Some("cut"),
                }
            }
            changed = board.changed(), if client.leaves_terminating_pods => {
                changed.unwrap();
                board.borrow_and_update().terminating(&pod).then_some("left a terminating pod")
            }
        };
        let Some(reason) = leave else { continue };
        drop(stream);
        let (next_pod, next_base) = {
            let found = board
                .wait_for(|b| b.ready_other_than(&pod).is_some())
                .await
                .unwrap();
            found.ready_other_than(&pod).unwrap()
        };
        streamed.attached.last_mut().unwrap().1 = reason;
        let mut request = http
            .get(format!(
                "{next_base}/api/chat/sessions/{}/stream",
                client.session
            ))
            .bearer_auth(&client.token);
        if let Some((last, _, _)) = streamed.events.last() {
            request = request.header("Last-Event-ID", last.to_string());
        }
        let response = request.send().await.unwrap();
        assert_eq!(
            response.status(),
            200,
            "{}: re-attaching on {next_pod}: {:?}",
            client.user,
            response.text().await
        );
        stream = events(response);
        pod = next_pod;
        streamed.attached.push((pod.clone(), "ended there"));
    }
}

/// The pod's termination grace period and its service's stream drain
/// (`PARLEY_STREAM_DRAIN_SECONDS`), in seconds.
fn drain_settings(pod: &Pod) -> (u64, u64) {
    let spec = pod.spec.as_ref().unwrap();
    let grace = spec.termination_grace_period_seconds.unwrap();
    let drain = spec.containers[0]
        .env
        .iter()
        .flatten()
        .find(|var| var.name == "PARLEY_STREAM_DRAIN_SECONDS")
        .and_then(|var| var.value.as_deref())
        .unwrap_or_else(|| panic!("no PARLEY_STREAM_DRAIN_SECONDS on {}", pod.name_any()));
    (u64::try_from(grace).unwrap(), drain.parse().unwrap())
}

fn micros(credits: &Value) -> i64 {
    (credits
        .as_f64()
        .unwrap_or_else(|| panic!("not a number: {credits}"))
        * 1e6)
        .round() as i64
}

/// Sends `signal` to the process of `pod`'s only container, found through
/// containerd (the test is on the node).
async fn signal_container(pod: &Pod, signal: &str) {
    let id = pod
        .status
        .as_ref()
        .unwrap()
        .container_statuses
        .as_ref()
        .unwrap()[0]
        .container_id
        .clone()
        .unwrap();
    let id = id.trim_start_matches("containerd://");
    let output = tokio::process::Command::new("ctr")
        .arg("--address")
        .arg(env::cluster_containerd())
        .args(["--namespace", "k8s.io", "tasks", "ls"])
        .output()
        .await
        .expect("running ctr (scripts/cluster.sh install installs containerd)");
    assert!(output.status.success(), "ctr tasks ls: {output:?}");
    let listing = String::from_utf8(output.stdout).unwrap();
    let pid = listing
        .lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            (fields.next() == Some(id)).then(|| fields.next().unwrap().to_owned())
        })
        .unwrap_or_else(|| panic!("no task {id} in {listing}"));
    let status = tokio::process::Command::new("kill")
        .args([signal, &pid])
        .status()
        .await
        .unwrap();
    assert!(status.success(), "kill {signal} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parley_on_a_one_node_cluster_serves_routes_and_streams_through_rollouts() {
    let cluster = Cluster::connect().await;
    let started = Instant::now();
    cluster.install_charts().await;
    log(format!(
        "charts installed, operator Ready: {}",
        seconds(started.elapsed())
    ));

    // --- a ChatDeployment becomes pods of the service image answering replies
    prepare_namespace(&cluster.client, NAMESPACE).await;
    let applied = Instant::now();
    apply::<ChatDeployment>(&cluster.client, NAMESPACE, chat_deployment(CHAT, 2, 600)).await;
    let pods = cluster.wait_rolled_out(NAMESPACE, CHAT, 2).await;
    let ready = applied.elapsed();
    let first = token("first-user");
    let base = pod_base(&pods[0]);
    let session = cluster.session(&base, &first).await;
    let message = "hello from a pod of the one-node cluster";
    let events = reply(&cluster, &base, &first, &session, message).await;
    let first_reply = applied.elapsed();
    assert_eq!(events.last().unwrap().1, "complete", "{events:?}");
    assert_eq!(reply_text(&events), message);
    log(format!(
        "ChatDeployment applied -> 2 pods Ready: {}; -> first reply served (by {}): {}",
        seconds(ready),
        pods[0].name_any(),
        seconds(first_reply)
    ));

    route_edit_reaches_every_pod(&cluster, &pods, &first).await;
    rollout_keeps_every_stream(&cluster).await;
    standby_operator_finishes_a_reconcile_its_leader_left(&cluster).await;
    deleting_chat_deployments_removes_every_child(&cluster).await;
    log(format!("whole test: {}", seconds(started.elapsed())));
}

async fn route_edit_reaches_every_pod(cluster: &Cluster, pods: &[Pod], token: &str) {
    for pod in pods {
        assert_eq!(
            cluster.served_model(&pod_base(pod), token).await,
            "simulated-small"
        );
    }
    let edited = Instant::now();
    apply::<ModelRoute>(&cluster.client, NAMESPACE, model_route("simulated-edited")).await;
    let mut waits = Vec::new();
    for pod in pods {
        let base = pod_base(pod);
        let name = pod.name_any();
        waits.push(async move {
            eventually(
                &format!("the route edit served by {name}"),
                WAIT,
                || async {
                    (cluster.served_model(&base, token).await == "simulated-edited")
                        .then(Instant::now)
                },
            )
            .await;
            (name, edited.elapsed())
        });
    }
    let served = futures::future::join_all(waits).await;
    let everywhere = served.iter().map(|(_, after)| *after).max().unwrap();
    let each: Vec<String> = served
        .iter()
        .map(|(pod, after)| format!("{pod} {}", seconds(*after)))
        .collect();
    log(format!(
        "ModelRoute edit -> served by every pod: {} ({}; target: within 2 s)",
        seconds(everywhere),
        each.join(", ")
    ));
}

async fn rollout_keeps_every_stream(cluster: &Cluster) {
    let old_pods = ready_pods(&cluster.client, NAMESPACE, CHAT).await;
    assert_eq!(old_pods.len(), 2);
    let (board, poller) = watch_pods(cluster.client.clone(), NAMESPACE, CHAT);
    let (started_tx, mut started_rx) = tokio::sync::mpsc::channel(ROLLOUT_REPLIES);
    let mut clients = Vec::new();
    for index in 0..ROLLOUT_REPLIES {
        let user = format!("rollout-user-{index:02}");
        let token = token(&user);
        let pod = &old_pods[index % 2];
        let session = cluster.session(&pod_base(pod), &token).await;
        let prompt: Vec<String> = (0..ROLLOUT_REPLY_WORDS)
            .map(|word| format!("r{index}w{word}"))
            .collect();
        let client = Client20 {
            user,
            token,
            session,
            prompt: prompt.join(" "),
            leaves_terminating_pods: index % 4 >= 2,
        };
        clients.push(tokio::spawn(stream_through_rollout(
            cluster.http.clone(),
            client,
            board.clone(),
            (pod.name_any(), pod_base(pod)),
            started_tx.clone(),
        )));
    }
    for _ in 0..ROLLOUT_REPLIES {
        started_rx.recv().await.unwrap();
    }
    // A spec change that reaches the pod template: the Deployment rolls.
    let rolled = Instant::now();
    apply::<ChatDeployment>(&cluster.client, NAMESPACE, chat_deployment(CHAT, 2, 601)).await;
    log(format!(
        "{ROLLOUT_REPLIES} replies streaming (10 per pod); ChatDeployment changed: rolling"
    ));
    // Each pod being replaced stops taking new replies once it is told to
    // stop: its `/ready` fails (503 while draining, or the connection
    // refused once it no longer accepts), while its replies go on.
    let mut refusals = Vec::new();
    for old in &old_pods {
        let (name, base, http) = (old.name_any(), pod_base(old), cluster.http.clone());
        let mut board = board.clone();
        refusals.push(tokio::spawn(async move {
            board.wait_for(|b| b.terminating(&name)).await.unwrap();
            let how = eventually(
                &format!("{name} refusing new replies while terminating"),
                WAIT,
                || async {
                    let probe = http
                        .get(format!("{base}/ready"))
                        .timeout(Duration::from_secs(2))
                        .send()
                        .await;
                    match probe {
                        Ok(response) if response.status().is_success() => None,
                        Ok(response) => Some(format!("/ready answered {}", response.status())),
                        Err(error) if error.is_connect() => {
                            Some("connections to it refused".to_owned())
                        }
                        Err(_) => None,
                    }
                },
            )
            .await;
            (name, Instant::now(), how)
        }));
    }
    let new_pods = cluster.wait_rolled_out(NAMESPACE, CHAT, 2).await;
    log(format!(
        "rollout complete (2 new pods Ready, the old ones gone): {}",
        seconds(rolled.elapsed())
    ));
    let mut streamed = Vec::new();
    for client in clients {
        streamed.push(client.await.unwrap());
    }
    // The rollout was seen complete with the old pods gone; the board may
    // see them go a poll later.
    let old_names: Vec<String> = old_pods.iter().map(ResourceExt::name_any).collect();
    let board = tokio::time::timeout(
        WAIT,
        board.clone().wait_for(|b| {
            old_names
                .iter()
                .all(|name| b.pods.get(name).is_some_and(|p| p.gone_at.is_some()))
        }),
    )
    .await
    .expect("the old pods seen gone")
    .unwrap()
    .clone();
    poller.abort();
    for pod in &new_pods {
        assert!(!old_pods.iter().any(|old| old.name_any() == pod.name_any()));
    }

    // Each reply: complete, every event once and in order, the whole text.
    let tokens: Vec<String> = (0..ROLLOUT_REPLIES)
        .map(|i| token(&format!("rollout-user-{i:02}")))
        .collect();
    for (index, reply) in streamed.iter().enumerate() {
        let ids: Vec<u64> = reply.events.iter().map(|(id, _, _)| *id).collect();
        assert_eq!(
            ids,
            (1..=ids.len() as u64).collect::<Vec<_>>(),
            "reply {index}: a gap or a duplicate across {:?}",
            reply.attached
        );
        let (_, last, data) = reply.events.last().unwrap();
        assert_eq!(
            last, "complete",
            "reply {index} ended with {last} {data} (read from {:?})",
            reply.attached
        );
        let words: Vec<String> = (0..ROLLOUT_REPLY_WORDS)
            .map(|word| format!("r{index}w{word}"))
            .collect();
        assert_eq!(reply_text(&reply.events), words.join(" "), "reply {index}");
    }

    // The pods being replaced kept streaming: each had replies running when
    // it began terminating; the clients that stayed were never cut, and the
    // ones that left re-attached elsewhere.
    let mut refused = BTreeMap::new();
    for refusal in refusals {
        let (name, at, how) = refusal.await.unwrap();
        refused.insert(name, (at, how));
    }
    for old in &old_pods {
        let name = old.name_any();
        let (grace, drain) = drain_settings(old);
        assert_eq!(
            (grace, drain),
            (MAX_STREAM_SECONDS + 30, MAX_STREAM_SECONDS),
            "{name}: termination grace and stream drain from maxStreamDurationSeconds"
        );
        let seen = &board.pods[&name];
        let terminating = seen
            .terminating_since
            .unwrap_or_else(|| panic!("{name} never seen terminating"));
        let gone = seen.gone_at.unwrap_or_else(|| panic!("{name} still there"));
        let generated_here: Vec<&Streamed> = streamed
            .iter()
            .filter(|r| r.attached[0].0 == name)
            .collect();
        let running = generated_here
            .iter()
            .filter(|r| r.ended > terminating)
            .count();
        let last_end = generated_here.iter().map(|r| r.ended).max().unwrap();
        assert!(
            running > 0,
            "no reply of {name} was still streaming when it began terminating: make the replies longer"
        );
        let (refused_at, how) = &refused[&name];
        assert!(
            *refused_at < last_end,
            "{name} still took new replies after its last reply ended"
        );
        log(format!(
            "{name}: {running} of its {} replies still streaming when it began terminating; {} later it refused new replies ({how}) while they went on; its last reply ended {} after it began terminating, the pod went away {} after (grace {grace}s, stream drain {drain}s)",
            generated_here.len(),
            seconds(refused_at.saturating_duration_since(terminating)),
            seconds(last_end - terminating),
            seconds(gone - terminating),
        ));
        assert!(
            gone >= last_end || (last_end - gone) < Duration::from_millis(500),
            "{name} went away before its replies ended"
        );
    }
    let stayed: Vec<&Streamed> = streamed
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 4 < 2)
        .map(|(_, r)| r)
        .collect();
    for reply in &stayed {
        assert_eq!(
            reply.attached.len(),
            1,
            "a client that stayed on its pod was cut: {:?}",
            reply.attached
        );
    }
    let moved = streamed.iter().filter(|r| r.attached.len() > 1).count();
    let cut = streamed
        .iter()
        .flat_map(|r| &r.attached)
        .filter(|(_, why)| *why == "cut")
        .count();
    assert_eq!(
        cut,
        0,
        "connections cut: {:?}",
        streamed.iter().map(|r| &r.attached).collect::<Vec<_>>()
    );
    for old in &old_pods {
        let left = streamed
            .iter()
            .filter(|r| {
                r.attached
                    .iter()
                    .any(|(pod, why)| *pod == old.name_any() && *why == "left a terminating pod")
            })
            .count();
        assert!(
            left > 0,
            "no client left {} while it terminated",
            old.name_any()
        );
    }
    log(format!(
        "all {ROLLOUT_REPLIES} replies complete, no gap; {} clients stayed on their terminating pod to the end, {moved} re-attached elsewhere with Last-Event-ID, 0 cut",
        stayed.len()
    ));

    // The ledger: one usage record per reply, charged what `complete` said,
    // the balance down by exactly that, nothing held.
    let base = pod_base(&new_pods[0]);
    for (index, reply) in streamed.iter().enumerate() {
        let token = &tokens[index];
        let complete = &reply.events.last().unwrap().2;
        let usage = cluster.get(&base, "/api/credits/usage", token).await;
        let records = usage["records"].as_array().unwrap();
        assert_eq!(records.len(), 1, "reply {index}: usage records {usage}");
        let record = &records[0];
        assert_eq!(record["outcome"], "completed", "{record}");
        assert_eq!(
            micros(&record["charged"]),
            micros(&complete["credits"]["charged"]),
            "{record} vs {complete}"
        );
        let balance = cluster.get(&base, "/api/credits/balance", token).await;
        assert_eq!(micros(&balance["held"]), 0, "reply {index}: {balance}");
        assert_eq!(
            micros(&balance["balance"]),
            i64::try_from(INITIAL_CREDITS).unwrap() * 1_000_000 - micros(&record["charged"]),
            "reply {index}: {balance} after {record}"
        );
    }
    log(format!(
        "ledger: {ROLLOUT_REPLIES} usage records, one per reply; every balance = initial - charged, nothing held"
    ));
}

async fn standby_operator_finishes_a_reconcile_its_leader_left(cluster: &Cluster) {
    let leader = cluster.leader().await;
    let operator_pods: Api<Pod> = Api::namespaced(cluster.client.clone(), OPERATOR_NAMESPACE);
    let leader_pod = operator_pods.get(&leader).await.unwrap();
    let standby = operator_pods
        .list(&ListParams::default().labels("app.kubernetes.io/component=operator"))
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|p| p.name_any())
        .find(|name| *name != leader)
        .expect("a second operator pod");

    // The leader gets half way: a quota refuses the Deployment, so it has
    // applied the children before it and retries later.
    prepare_namespace(&cluster.client, TAKEOVER).await;
    let quotas: Api<ResourceQuota> = Api::namespaced(cluster.client.clone(), TAKEOVER);
    apply::<ResourceQuota>(
        &cluster.client,
        TAKEOVER,
        json!({
            "apiVersion": "v1", "kind": "ResourceQuota",
            "metadata": {"name": "no-deployments"},
            "spec": {"hard": {"count/deployments.apps": "0"}},
        }),
    )
    .await;
    eventually("the quota counted", WAIT, || async {
        quotas
            .get("no-deployments")
            .await
            .ok()?
            .status?
            .hard
            .map(|_| ())
    })
    .await;
    apply::<ChatDeployment>(&cluster.client, TAKEOVER, chat_deployment(TAKEOVER, 1, 600)).await;
    let client = &cluster.client;
    eventually("the leader's first children of takeover", WAIT, || async {
        Api::<Service>::namespaced(client.clone(), TAKEOVER)
            .get(TAKEOVER)
            .await
            .ok()
    })
    .await;
    assert!(
        Api::<Deployment>::namespaced(client.clone(), TAKEOVER)
            .get_opt(TAKEOVER)
            .await
            .unwrap()
            .is_none()
    );

    // The leader stops dead (as a hung or partitioned node: it renews nothing
    // and applies nothing); the quota goes.
    signal_container(&leader_pod, "-STOP").await;
    let stopped = Instant::now();
    quotas
        .delete("no-deployments", &DeleteParams::default())
        .await
        .unwrap();
    log(format!(
        "operator leader {leader} stopped mid-reconcile (takeover's Service applied, its Deployment refused)"
    ));
    let leases: Api<Lease> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    eventually("the standby taking the Lease over", WAIT, || async {
        let holder = leases
            .get(parley_operator::leader::LEASE_NAME)
            .await
            .ok()?
            .spec?
            .holder_identity?;
        (holder == standby).then_some(())
    })
    .await;
    let took_over = stopped.elapsed();
    cluster.wait_rolled_out(TAKEOVER, TAKEOVER, 1).await;
    log(format!(
        "{standby} took the Lease over {} after the leader stopped, and finished the reconcile (takeover Ready) {} after",
        seconds(took_over),
        seconds(stopped.elapsed())
    ));

    // Killed for good, the old leader's container restarts and stands by.
    signal_container(&leader_pod, "-KILL").await;
    eventually(
        "the killed operator restarted and standing by",
        WAIT,
        || async {
            let pod = operator_pods.get(&leader).await.ok()?;
            let restarted = pod.status.as_ref()?.container_statuses.as_ref()?[0].restart_count >= 1;
            (restarted && pod_ready(&pod)).then_some(())
        },
    )
    .await;
    let holder = leases
        .get(parley_operator::leader::LEASE_NAME)
        .await
        .unwrap()
        .spec
        .unwrap()
        .holder_identity;
    assert_eq!(holder.as_deref(), Some(standby.as_str()));
    log(format!(
        "{leader} restarted after SIGKILL and stands by; {standby} keeps the Lease"
    ));
}

async fn deleting_chat_deployments_removes_every_child(cluster: &Cluster) {
    let deleted = Instant::now();
    for (namespace, name) in [(NAMESPACE, CHAT), (TAKEOVER, TAKEOVER)] {
        Api::<ChatDeployment>::namespaced(cluster.client.clone(), namespace)
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }
    for (namespace, name) in [(NAMESPACE, CHAT), (TAKEOVER, TAKEOVER)] {
        let client = &cluster.client;
        let selector = format!("{INSTANCE_LABEL}={name}");
        eventually(
            &format!("every child of {namespace}/{name} removed"),
            WAIT,
            || async {
                let params = ListParams::default().labels(&selector);
                let left = [
                    count::<Deployment>(client, namespace, &params).await?,
                    count::<ReplicaSet>(client, namespace, &params).await?,
                    count::<Pod>(client, namespace, &params).await?,
                    count::<Service>(client, namespace, &params).await?,
                    count::<ConfigMap>(client, namespace, &params).await?,
                    count::<ServiceAccount>(client, namespace, &params).await?,
                    count::<Role>(client, namespace, &params).await?,
                    count::<RoleBinding>(client, namespace, &params).await?,
                ];
                left.iter().all(|n| *n == 0).then_some(())
            },
        )
        .await;
    }
    log(format!(
        "ChatDeployments deleted -> every child (Deployment, ReplicaSets, pods, Service, ConfigMap, ServiceAccount, Role, RoleBinding) removed by the garbage collector: {}",
        seconds(deleted.elapsed())
    ));
}

async fn count<K>(client: &Client, namespace: &str, params: &ListParams) -> Option<usize>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
{
    Some(
        Api::<K>::namespaced(client.clone(), namespace)
            .list(params)
            .await
            .ok()?
            .items
            .len(),
    )
}
