//! Connections to Redis, configured the same way for every user of it (the
//! shared rate limits, the reply hub).

use std::time::Duration;

use redis::RedisError;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::error::Error;

/// Redis answers in well under a millisecond; a slow answer is an outage.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);

/// The client of `PARLEY_REDIS_URL`; a configuration error when it is not a URL.
pub fn client(url: &str) -> Result<redis::Client, Error> {
    redis::Client::open(url)
        .map_err(|error| Error::Config(format!("invalid PARLEY_REDIS_URL: {error}")))
}

/// A multiplexed connection that reconnects by itself and gives up on an
/// answer after [`RESPONSE_TIMEOUT`]; fails when Redis cannot be reached now.
pub async fn connect(client: &redis::Client) -> Result<ConnectionManager, RedisError> {
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(RESPONSE_TIMEOUT))
        .set_connection_timeout(Some(RESPONSE_TIMEOUT))
        .set_number_of_retries(1);
    client.get_connection_manager_with_config(config).await
}
