//! Leader election on a coordination.k8s.io/v1 Lease, so that only one of
//! several operator replicas reconciles at a time.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio_util::sync::CancellationToken;

use crate::Error;

/// Lease name shared by every operator replica.
pub const LEASE_NAME: &str = "parley-operator";
const LEASE_SECONDS: i32 = 15;
const RENEW_EVERY: Duration = Duration::from_secs(5);

/// Where the Lease lives and who we are.
#[derive(Debug, Clone)]
pub struct Election {
    pub namespace: String,
    pub identity: String,
}

/// Runs `work` while this replica holds the Lease; when leadership is lost
/// the token given to `work` is cancelled and election starts again. Returns
/// once `shutdown` is cancelled and `work` has ended.
///
/// `standby_ready` is set while this replica takes part in the election
/// without leading: a standby replica is healthy, and a rolling update of the
/// operator must not wait for it to become leader (which it cannot until the
/// old leader goes away).
pub async fn run_as_leader<W, F>(
    client: Client,
    election: Election,
    shutdown: CancellationToken,
    standby_ready: Arc<AtomicBool>,
    work: W,
) -> Result<(), Error>
where
    W: Fn(CancellationToken) -> F,
    F: Future<Output = Result<(), Error>> + Send + 'static,
{
    let leases: Api<Lease> = Api::namespaced(client, &election.namespace);
    let mut tick = tokio::time::interval(RENEW_EVERY);
    while !shutdown.is_cancelled() {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        match try_hold(&leases, &election.identity).await {
            Ok(true) => {}
            Ok(false) => {
                standby_ready.store(true, Ordering::SeqCst);
                continue;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot reach the leader Lease; retrying");
                standby_ready.store(false, Ordering::SeqCst);
                continue;
            }
        }
        tracing::info!(identity = %election.identity, "became leader");
        let leading = shutdown.child_token();
        let mut worker = tokio::spawn(work(leading.clone()));
        let outcome = loop {
            tokio::select! {
                joined = &mut worker => break Some(joined),
                _ = tick.tick() => {
                    let held = try_hold(&leases, &election.identity).await.unwrap_or_else(|error| {
                        tracing::warn!(%error, "renewing the leader Lease failed");
                        false
                    });
                    if !held {
                        tracing::warn!("lost leadership; stopping controllers");
                        leading.cancel();
                    }
                }
            }
        };
        if let Some(joined) = outcome {
            match joined {
                Ok(result) => result?,
                Err(error) => tracing::error!(%error, "controllers task failed"),
            }
        }
    }
    release(&leases, &election.identity).await
}

/// Takes or renews the Lease; false when another live holder has it.
async fn try_hold(leases: &Api<Lease>, identity: &str) -> Result<bool, Error> {
    let now = Timestamp::now();
    let Some(mut lease) = leases.get_opt(LEASE_NAME).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(LEASE_NAME.to_owned()),
                ..ObjectMeta::default()
            },
            spec: Some(held_by(identity, now, None)),
        };
        return match leases.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(error) => Err(error.into()),
        };
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let ours = spec.holder_identity.as_deref() == Some(identity);
    let expired = match (&spec.holder_identity, &spec.renew_time) {
        (None, _) | (_, None) => true,
        (Some(_), Some(renewed)) => {
            let seconds = spec.lease_duration_seconds.unwrap_or(LEASE_SECONDS);
            renewed.0 + SignedDuration::from_secs(i64::from(seconds)) < now
        }
    };
    if !ours && !expired {
        return Ok(false);
    }
    let acquired = if ours {
        spec.acquire_time.clone()
    } else {
        None
    };
    let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!ours);
    let mut next = held_by(identity, now, acquired);
    next.lease_transitions = Some(transitions);
    lease.spec = Some(next);
    // The resourceVersion in `lease` makes this a compare-and-swap.
    match leases
        .replace(LEASE_NAME, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(error) => Err(error.into()),
    }
}

fn held_by(identity: &str, now: Timestamp, acquired: Option<MicroTime>) -> LeaseSpec {
    LeaseSpec {
        holder_identity: Some(identity.to_owned()),
        lease_duration_seconds: Some(LEASE_SECONDS),
        acquire_time: Some(acquired.unwrap_or(MicroTime(now))),
        renew_time: Some(MicroTime(now)),
        ..LeaseSpec::default()
    }
}

/// Gives the Lease up on shutdown so another replica takes over at once.
async fn release(leases: &Api<Lease>, identity: &str) -> Result<(), Error> {
    let Some(mut lease) = leases.get_opt(LEASE_NAME).await? else {
        return Ok(());
    };
    let Some(spec) = lease.spec.as_mut() else {
        return Ok(());
    };
    if spec.holder_identity.as_deref() != Some(identity) {
        return Ok(());
    }
    spec.holder_identity = None;
    spec.renew_time = None;
    match leases
        .replace(LEASE_NAME, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(error) => Err(error.into()),
    }
}
