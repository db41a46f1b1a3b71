//! What the API server serves, by discovery.

use kube::Client;

use crate::Error;
use crate::build::Capabilities;

/// Resource names served under `api_version`, empty when the group/version is absent.
async fn served(client: &Client, api_version: &str) -> Result<Vec<String>, Error> {
    match client.list_api_group_resources(api_version).await {
        Ok(list) => Ok(list.resources.into_iter().map(|r| r.name).collect()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(Vec::new()),
        Err(err) => Err(err.into()),
    }
}

async fn serves(client: &Client, api_version: &str, resource: &str) -> Result<bool, Error> {
    Ok(served(client, api_version)
        .await?
        .iter()
        .any(|name| name == resource))
}

/// The optional APIs the build step adapts to.
pub async fn capabilities(client: &Client) -> Result<Capabilities, Error> {
    let version = client.apiserver_version().await?;
    let minor: u32 = version
        .minor
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap_or(0);
    Ok(Capabilities {
        autoscaling_v2: serves(client, "autoscaling/v2", "horizontalpodautoscalers").await?,
        policy_v1: serves(client, "policy/v1", "poddisruptionbudgets").await?,
        service_monitor: serves(client, "monitoring.coreos.com/v1", "servicemonitors").await?,
        pre_stop_sleep: version.major == "1" && minor >= 30,
    })
}

/// How many of the Parley CRDs the API server does not serve yet.
pub async fn missing_crds(client: &Client) -> Result<usize, Error> {
    let served = served(client, "parley.dev/v1alpha1").await?;
    Ok(["chatdeployments", "modelroutes"]
        .iter()
        .filter(|name| !served.iter().any(|s| s == *name))
        .count())
}
