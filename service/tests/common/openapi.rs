//! The served OpenAPI document as tests read it: its operations, and whether
//! an answer is one the document lists, with a body its schema admits.

use axum::Router;
use serde_json::{Value, json};

use super::{request, send};

pub const METHODS: [&str; 5] = ["get", "put", "post", "delete", "patch"];

pub struct Document(pub Value);

/// One operation: `GET`, `/api/chat/sessions/{id}`, and its description.
#[derive(Debug, Clone)]
pub struct Operation {
    pub method: String,
    pub path: String,
    pub spec: Value,
}

impl Operation {
    pub fn has_body(&self) -> bool {
        self.spec.get("requestBody").is_some()
    }

    pub fn is_authenticated(&self) -> bool {
        self.spec["security"]
            .as_array()
            .is_some_and(|requirements| !requirements.is_empty())
    }

    /// Parameters of one location (`query`, `path`, `header`).
    pub fn parameters(&self, location: &str) -> Vec<&Value> {
        self.spec["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|parameter| parameter["in"] == location)
            .collect()
    }

    pub fn statuses(&self) -> Vec<String> {
        self.spec["responses"]
            .as_object()
            .map(|responses| responses.keys().cloned().collect())
            .unwrap_or_default()
    }
}

impl Document {
    /// The document `router` serves.
    pub async fn served(router: &Router) -> Self {
        let (status, document) =
            send(router, request("GET", "/api/openapi.json", None, None)).await;
        assert!(status.is_success(), "{status}");
        Self(document)
    }

    pub fn operations(&self) -> Vec<Operation> {
        let mut operations = Vec::new();
        for (path, item) in self.0["paths"].as_object().unwrap() {
            for method in METHODS {
                if let Some(spec) = item.get(method) {
                    operations.push(Operation {
                        method: method.to_uppercase(),
                        path: path.clone(),
                        spec: spec.clone(),
                    });
                }
            }
        }
        operations
    }

    pub fn operation(&self, method: &str, path: &str) -> Operation {
        self.operations()
            .into_iter()
            .find(|operation| operation.method == method && operation.path == path)
            .unwrap_or_else(|| panic!("{method} {path} is not in the document"))
    }

    /// Fails unless `operation` documents `status` and, when it documents a
    /// JSON answer there, `body` (`Null` when the answer was not JSON) is
    /// valid against its schema.
    pub fn assert_answer(&self, operation: &Operation, status: u16, body: &Value, context: &str) {
        let name = format!("{} {}", operation.method, operation.path);
        let Some(response) = operation.spec["responses"].get(status.to_string()) else {
            panic!(
                "{name} answered {status}, which its document does not list ({context}): {body}"
            );
        };
        let Some(schema) = response["content"]["application/json"].get("schema") else {
            return;
        };
        assert!(
            !body.is_null(),
            "{name} answered {status} without the JSON body its document lists ({context})"
        );
        let mut root = schema.clone();
        root["components"] = self.0["components"].clone();
        if let Err(error) = jsonschema::validate(&root, body) {
            panic!(
                "{name} answered {status} with a body its document's schema refuses \
                 ({context}): {error}\nbody: {body}\nschema: {}",
                json!(schema)
            );
        }
    }
}
