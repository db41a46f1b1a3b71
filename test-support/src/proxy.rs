//! A TCP proxy in front of a real server, for outage tests: stopping it
//! closes the listener and every forwarded connection, as a crashed or
//! partitioned server would; starting it again on the same port ends the outage.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Forwards TCP connections to `target` until stopped.
pub struct TcpProxy {
    address: SocketAddr,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl TcpProxy {
    /// Listens on `address` (the same port again after a stop) or on a free
    /// loopback port, and forwards to `target` (`host:port`).
    pub async fn start(target: String, address: Option<SocketAddr>) -> std::io::Result<Self> {
        let listener = TcpListener::bind(address.unwrap_or(([127, 0, 0, 1], 0).into())).await?;
        let address = listener.local_addr()?;
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let (stopped, connections) = (stop.clone(), tasks.clone());
        tasks.spawn(async move {
            loop {
                let mut inbound = tokio::select! {
                    () = stopped.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((inbound, _)) => inbound,
                        Err(_) => return,
                    },
                };
                let target = target.clone();
                let stopped = stopped.clone();
                connections.spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        () = stopped.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                });
            }
        });
        Ok(Self {
            address,
            stop,
            tasks,
        })
    }

    /// Where clients connect.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Returns once the listener and every forwarded connection are closed.
    pub async fn stop(&self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// Host and port of a `scheme://[user@]host:port/...` URL.
pub fn host_port(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let rest = rest.rsplit_once('@').map_or(rest, |(_, hosts)| hosts);
    rest.split(['/', '?']).next()
}
