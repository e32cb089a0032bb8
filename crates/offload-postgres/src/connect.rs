//! How a node opens its connections: what it asks of each session, and
//! how.
//!
//! The settings are SET once a connection is open, not sent in its
//! startup message: a connection pooler in front of PostgreSQL (PgBouncer,
//! in session mode) takes only a few startup parameters and refuses a
//! connection that carries any other (`unsupported startup parameter:
//! options`), and so for sqlx's own `extra_float_digits`, which nothing
//! here needs (values come back in binary). One round trip more for each
//! connection opened; connections live long.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use offload_core::{Error, Result};
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions};

#[derive(Clone, Debug)]
pub(crate) struct Connector {
    pub options: PgConnectOptions,
    /// `SET` statements, run on each connection once it is open.
    settings: Arc<str>,
}

impl Connector {
    /// Connections to the database `url` names, for the store in `schema`
    /// (a plain name, checked), whose operations run within
    /// `operation_timeout`.
    pub fn new(url: &str, schema: &str, operation_timeout: Duration) -> Result<Self> {
        let mut options = connect_options(url)?.extra_float_digits(None);
        // An application_name in the URL tells nodes apart in
        // pg_stat_activity.
        if options.get_application_name().is_none() {
            options = options.application_name("offload");
        }
        let idle_in_transaction = operation_timeout.as_millis().max(1);
        // A prepared statement's first five runs are planned for their
        // parameters: on a table just filled, before autovacuum's ANALYZE,
        // a claim's or an ack's 500 seqs or ids looked cheaper to hash
        // against a sequential scan of every task than to look up one by
        // one, ~10 ms a batch on 60,000 tasks, on each of the pool's
        // connections. So each statement is planned once, generically, and
        // every statement here is written for that plan; a generic plan made
        // while the tables are small must not read them whole either, which
        // is what `sql::PLANNER_SETTINGS` (and the `sql` module) is about.
        //
        // PostgreSQL's notices (a `CREATE … IF NOT EXISTS` that found its
        // object, on every start) are not the operator's concern; warnings
        // and errors still come through.
        //
        // The client library sets no keepalives on its side. Asked of the
        // server, they keep a quiet connection's state alive in a NAT or
        // firewall between, and end within half a minute a session whose
        // node is gone, with the leader lock it held; the server's default
        // waits two hours.
        //
        // No transaction here waits on its node for long between
        // statements; one that has waited past the operation's time limit
        // was given up (`session.rs`), and the server ends it then, with
        // its locks, even where something between still keeps the
        // connection up.
        let settings = format!(
            "SET search_path = {schema}; {} \
             SET client_min_messages = warning; SET tcp_keepalives_idle = 15; \
             SET tcp_keepalives_interval = 5; SET tcp_keepalives_count = 3; \
             SET idle_in_transaction_session_timeout = {idle_in_transaction}",
            crate::sql::PLANNER_SETTINGS
        );
        Ok(Self {
            options,
            settings: settings.into(),
        })
    }

    /// A pool whose connections are set up as [`Connector::connect`]'s.
    pub fn pool(&self) -> PgPoolOptions {
        let settings = Arc::clone(&self.settings);
        PgPoolOptions::new().after_connect(move |conn, _| {
            let settings = Arc::clone(&settings);
            Box::pin(async move { set_up(conn, &settings).await })
        })
    }

    /// One connection of its own, set up.
    pub async fn connect(&self) -> Result<PgConnection, sqlx::Error> {
        let mut conn = PgConnection::connect_with(&self.options).await?;
        set_up(&mut conn, &self.settings).await?;
        Ok(conn)
    }
}

async fn set_up(conn: &mut PgConnection, settings: &str) -> Result<(), sqlx::Error> {
    // Without parameters, by the simple protocol: every statement in one
    // round trip.
    sqlx::Executor::execute(conn, settings).await.map(|_| ())
}

pub(crate) fn connect_options(url: &str) -> Result<PgConnectOptions> {
    PgConnectOptions::from_str(url)
        .map_err(|e| Error::invalid("db", format!("not a PostgreSQL URL: {e}")))
}

/// What one connection of the node's own meets, where the pool, whose
/// attempts timed out, says only that they did.
pub(crate) enum Probe {
    /// PostgreSQL (or the way to it) refused, with its reason.
    Refused(sqlx::Error),
    /// The connection opened (and was closed again).
    Opened,
    /// No answer within the limit: a host that drops the packets, whose
    /// own connect timeout runs to minutes.
    Silent,
}

/// Opens one connection with `options` within `limit`, to say why the
/// pool could not.
pub(crate) async fn probe(options: &PgConnectOptions, limit: Duration) -> Probe {
    match tokio::time::timeout(limit, PgConnection::connect_with(options)).await {
        Ok(Err(e)) => Probe::Refused(e),
        Ok(Ok(conn)) => {
            let _ = tokio::time::timeout(limit, conn.close()).await;
            Probe::Opened
        }
        Err(_) => Probe::Silent,
    }
}
