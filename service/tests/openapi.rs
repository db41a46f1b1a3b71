//! The served OpenAPI document agrees with the answers: every operation
//! lists the errors of the extractors it uses, and every answer a probe gets
//! from any documented operation — bad tokens, bad bodies, bad queries, bad
//! ids — is a status the document lists, with a body its schema admits.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use axum::body::Body;
use axum::http::{Request, header};
use common::openapi::{Document, Operation};
use common::{MAX_BODY_BYTES, TestApp, create_session, token};
use parley_service::auth::Role;
use serde_json::{Value, json};

/// The statuses and codes an operation lists under a status, as one text.
fn described(operation: &Operation, status: &str) -> String {
    operation.spec["responses"][status]["description"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn every_operation_lists_the_errors_of_its_body_query_and_token() {
    let app = TestApp::with_dev_sign_in().await;
    let document = Document::served(&app.router).await;
    let operations = document.operations();
    assert!(operations.len() >= 19, "{}", operations.len());
    for operation in operations {
        let name = format!("{} {}", operation.method, operation.path);
        let statuses = operation.statuses();
        if operation.has_body() {
            for status in ["400", "408", "413", "415"] {
                assert!(
                    statuses.iter().any(|s| s == status),
                    "{name} lacks {status}"
                );
            }
            assert!(
                described(&operation, "415").contains("UNSUPPORTED_MEDIA_TYPE"),
                "{name}"
            );
            assert!(
                described(&operation, "400").contains("MALFORMED_JSON"),
                "{name}"
            );
        }
        if !operation.parameters("query").is_empty() {
            assert!(
                described(&operation, "400").contains("INVALID_QUERY"),
                "{name}"
            );
        }
        // Any token sent to /api/ is verified, whether the operation needs one or not.
        if operation.is_authenticated() || operation.path.starts_with("/api/") {
            assert!(
                described(&operation, "401").contains("INVALID_TOKEN"),
                "{name}"
            );
        }
        if operation.path.starts_with("/api/") {
            assert!(
                described(&operation, "429").contains("RATE_LIMITED"),
                "{name}"
            );
        }
    }
}

/// The models' prices are numbers, as their schema says (they were
/// documented as strings).
#[tokio::test]
async fn model_prices_are_numbers_in_the_answer_and_the_schema() {
    let app = TestApp::new().await;
    let document = Document::served(&app.router).await;
    let alice = token("alice", Role::User, &["c1"]);
    let (status, models) = app
        .send(common::request("GET", "/api/models", Some(&alice), None))
        .await;
    assert_eq!(status, 200);
    assert!(
        models["models"][0]["pricing"]["inputPer1k"].is_number(),
        "{models}"
    );
    let schemas = &document.0["components"]["schemas"];
    for field in ["inputPer1k", "outputPer1k"] {
        assert_eq!(schemas["PriceView"]["properties"][field]["type"], "number");
    }
    let operation = document.operation("GET", "/api/models");
    document.assert_answer(&operation, 200, &models, "models");
}

/// A request of one probe: what it changes from a valid call.
struct Probe {
    name: &'static str,
    authorization: Vec<String>,
    content_type: Option<&'static str>,
    body: Option<String>,
    query: String,
    headers: Vec<(String, &'static str)>,
    /// The `{id}` to use instead of an existing session of the caller.
    id: Option<String>,
}

fn probes(operation: &Operation, bearer: &str) -> Vec<Probe> {
    let base = || Probe {
        name: "",
        authorization: vec![format!("Bearer {bearer}")],
        content_type: operation.has_body().then_some("application/json"),
        body: operation.has_body().then(|| "{}".to_owned()),
        query: String::new(),
        headers: Vec::new(),
        id: None,
    };
    let mut probes = vec![
        Probe {
            name: "valid token, empty object body",
            ..base()
        },
        Probe {
            name: "no token",
            authorization: vec![],
            ..base()
        },
        Probe {
            name: "garbage token",
            authorization: vec!["Bearer x.y.z".into()],
            ..base()
        },
        Probe {
            name: "basic auth",
            authorization: vec!["Basic YTpi".into()],
            ..base()
        },
        Probe {
            name: "two Authorization headers",
            authorization: vec![format!("Bearer {bearer}"), format!("Bearer {bearer}")],
            ..base()
        },
        Probe {
            name: "unknown query parameter",
            query: "?zzUnknown=1".into(),
            ..base()
        },
    ];
    for parameter in operation.parameters("query") {
        let name = parameter["name"].as_str().unwrap();
        for value in ["abc", "-1", "0", "99999999999"] {
            probes.push(Probe {
                name: "odd query value",
                query: format!("?{name}={value}"),
                ..base()
            });
        }
    }
    for parameter in operation.parameters("header") {
        let name = parameter["name"].as_str().unwrap().to_owned();
        for value in ["-1", "abc", "99999999999999999999999", ""] {
            probes.push(Probe {
                name: "odd header value",
                headers: vec![(name.clone(), value)],
                ..base()
            });
        }
    }
    if operation.has_body() {
        let bodies: [(&str, Option<&'static str>, String); 7] = [
            ("no content type", None, "{}".into()),
            ("text content type", Some("text/plain"), "{}".into()),
            ("malformed JSON", Some("application/json"), "{\"a\":".into()),
            ("JSON array", Some("application/json"), "[]".into()),
            ("JSON null", Some("application/json"), "null".into()),
            (
                "unknown field",
                Some("application/json"),
                json!({"zzUnknown": 1}).to_string(),
            ),
            (
                "oversized body",
                Some("application/json"),
                json!({"message": "a".repeat(MAX_BODY_BYTES)}).to_string(),
            ),
        ];
        for (name, content_type, body) in bodies {
            probes.push(Probe {
                name,
                content_type,
                body: Some(body),
                ..base()
            });
        }
    }
    if operation.path.contains("{id}") {
        for id in [
            "not-hex",
            "0123456789abcdef01234567",
            "%00",
            "a".repeat(300).as_str(),
        ] {
            probes.push(Probe {
                name: "odd session id",
                id: Some(id.to_owned()),
                ..base()
            });
        }
    }
    probes
}

#[tokio::test]
async fn every_answer_to_a_probe_is_documented() {
    let app = TestApp::with_dev_sign_in().await;
    let document = Document::served(&app.router).await;
    let alice = token("alice", Role::User, &["c1"]);
    let mut answers = 0;
    for operation in document.operations() {
        for probe in probes(&operation, &alice) {
            // A fresh session each time (a probe may delete it), deleted after.
            let fresh = if operation.path.contains("{id}") && probe.id.is_none() {
                Some(create_session(&app.router, &alice, json!({})).await)
            } else {
                None
            };
            let id = probe
                .id
                .clone()
                .or_else(|| fresh.clone())
                .unwrap_or_default();
            let uri = operation.path.replace("{id}", &id) + &probe.query;
            let mut builder = Request::builder()
                .method(operation.method.as_str())
                .uri(&uri);
            for value in &probe.authorization {
                builder = builder.header(header::AUTHORIZATION, value);
            }
            for (name, value) in &probe.headers {
                builder = builder.header(name.as_str(), *value);
            }
            if let Some(content_type) = probe.content_type {
                builder = builder.header(header::CONTENT_TYPE, content_type);
            }
            let request = builder
                .body(probe.body.clone().map_or_else(Body::empty, Body::from))
                .unwrap();
            let (status, body): (_, Value) = common::send(&app.router, request).await;
            // Event streams are not JSON; their status is still checked.
            let body = if status == 200 && operation.path.ends_with("/stream") {
                Value::Null
            } else {
                body
            };
            let context = format!("{}: {uri}", probe.name);
            if status == 200 && body.is_null() {
                let listed = operation.statuses().contains(&"200".to_owned());
                assert!(listed, "{context}: 200 not documented");
            } else {
                document.assert_answer(&operation, status.as_u16(), &body, &context);
            }
            if let Some(id) = fresh {
                let uri = format!("/api/chat/sessions/{id}");
                common::send(
                    &app.router,
                    common::request("DELETE", &uri, Some(&alice), None),
                )
                .await;
            }
            answers += 1;
        }
    }
    assert!(answers > 100, "{answers}");
}
