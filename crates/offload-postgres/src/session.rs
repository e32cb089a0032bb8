//! A pooled connection that goes back to the pool only when nothing is in
//! flight on it, and the time limit every store operation runs within.
//!
//! Nothing below this crate bounds a statement's wait: the client library
//! sets no socket timeout, and a connection whose far end went silent (a
//! database host gone without a word, a failover that moved its address, a
//! NAT that forgot the connection) keeps an answer waiting until the kernel
//! gives up retransmitting, a quarter of an hour. Each operation therefore
//! runs within [`crate::PgOptions::operation_timeout`]. Given up, its
//! connection must not go back to the pool: the pool would test it with a
//! round trip of its own, with no limit either, holding one of the pool's
//! places for as long, and a few such connections leave the node none.
//! A [`Session`] dropped with a statement or transaction in flight is
//! closed instead, and the pool opens another.

use std::ops::{Deref, DerefMut};
use std::time::Duration;

use offload_core::Error;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnection, PgPool, Postgres};

use crate::connect::Probe;
use crate::rows::{PgError, PgResult, storage_error};

pub(crate) struct Session {
    conn: PoolConnection<Postgres>,
    settled: bool,
}

impl Session {
    /// A connection of `pool`'s: an idle one if there is one, else
    /// whichever comes first of one the pool opens and one another
    /// operation frees (which, just used, the pool does not check again).
    ///
    /// The pool's own wait does not look for freed connections once it
    /// has set out to open one, and it keeps trying to open one, refusal
    /// after refusal, until its timeout: when PostgreSQL refuses more
    /// connections (nodes whose pools together outgrow its
    /// `max_connections`), an operation waited 5 s and failed though the
    /// node's other connections came free meanwhile. So when none is idle,
    /// the pool's wait runs as a task of its own, whose connection, if it
    /// comes later, goes back to the pool, and this one takes a freed
    /// connection as soon as there is one. An idle connection taken by
    /// another operation between the look and the pool's wait still sends
    /// this one down the pool's way (1 in about 14,000 enqueues when eight
    /// nodes outgrew `max_connections`, 59 before).
    pub async fn acquire(pool: &PgPool) -> Result<Self, Error> {
        let session = |conn| Self {
            conn,
            settled: false,
        };
        // The usual case, without a task spawned: a connection idle, which
        // the pool checks is alive before handing it over.
        if pool.num_idle() > 0 {
            return match pool.acquire().await {
                Ok(conn) => Ok(session(conn)),
                Err(e) => Err(acquire_error(pool, e).await),
            };
        }
        let mut waiting = tokio::spawn(pool.acquire());
        loop {
            // Looking goes on even once the pool is full: its places may be
            // taken by other operations' attempts to open connections
            // that PostgreSQL refuses, while connections come free.
            tokio::select! {
                biased;
                acquired = &mut waiting => {
                    return match acquired {
                        Ok(Ok(conn)) => Ok(session(conn)),
                        Ok(Err(e)) => Err(acquire_error(pool, e).await),
                        Err(e) => Err(Error::Storage(format!("waiting for a connection: {e}"))),
                    };
                }
                () = tokio::time::sleep(FREED_CONNECTION_LOOK) => {
                    if let Some(conn) = pool.try_acquire() {
                        return Ok(session(conn));
                    }
                }
            }
        }
    }

    /// Says that every statement sent on the connection has been answered
    /// and no transaction is open: dropped after, it goes back to the pool.
    pub fn settle(&mut self) {
        self.settled = true;
    }
}

impl Deref for Session {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        &self.conn
    }
}

impl DerefMut for Session {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.conn
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if !self.settled {
            // Closing sends a goodbye, which the server, if it ever reads
            // it, takes as a rollback; the pool's place is free once it is
            // written to the socket, within 5 s even if it cannot be.
            self.conn.close_on_drop();
        }
    }
}

/// `operation` within `limit`; past it, the database counts as out of
/// reach, and whatever session the operation held is closed on the way
/// out (see [`Session`]).
pub(crate) async fn within<T>(
    limit: Duration,
    operation: impl Future<Output = PgResult<T>>,
) -> PgResult<T> {
    tokio::time::timeout(limit, operation)
        .await
        .unwrap_or_else(|_| Err(PgError::Core(no_answer(limit))))
}

/// The store's error for the pool's refusal to hand over a connection.
async fn acquire_error(pool: &PgPool, e: sqlx::Error) -> Error {
    match e {
        sqlx::Error::PoolTimedOut => no_connection(pool).await,
        e => storage_error(e),
    }
}

/// How often an operation whose pool is opening a connection for it looks
/// for one that another operation freed.
const FREED_CONNECTION_LOOK: Duration = Duration::from_millis(1);

/// How long [`no_connection`] waits for PostgreSQL to take or refuse a
/// connection of its own.
const DIAGNOSIS_CONNECT: Duration = Duration::from_secs(2);

/// Why the pool gave no connection within its wait, which it does not
/// say. With all of the node's connections open and busy, the node is
/// short of them (`db_pool_size`). With fewer open, the pool was trying to
/// open one, and one connection of its own says why it could not: most
/// often PostgreSQL refusing more ("sorry, too many clients already", when
/// the nodes' pools together outgrow `max_connections`).
async fn no_connection(pool: &PgPool) -> Error {
    let (open, most) = (pool.size(), pool.options().get_max_connections());
    let why = if open >= most {
        format!("all of this node's {most} connections were busy (db_pool_size)")
    } else {
        let held = format!("this node has {open} of its {most} connections open or opening");
        match crate::connect::probe(&pool.connect_options(), DIAGNOSIS_CONNECT).await {
            Probe::Refused(e) => format!("{held}, and PostgreSQL refuses more: {e}"),
            Probe::Opened => format!("{held} and could not open more"),
            Probe::Silent => format!(
                "{held}, and PostgreSQL did not answer a new connection within {}s",
                DIAGNOSIS_CONNECT.as_secs()
            ),
        }
    };
    Error::storage_unavailable(format_args!(
        "no connection to PostgreSQL came free within {}s: {why}",
        pool.options().get_acquire_timeout().as_secs()
    ))
}

/// The error of an operation that got no answer in time.
fn no_answer(limit: Duration) -> Error {
    Error::storage_unavailable(format_args!(
        "PostgreSQL did not answer within {}s; the operation's connection was closed",
        limit.as_secs_f64()
    ))
}

/// Runs `$body` (which uses `$conn`, a `&mut PgConnection`, and may use
/// `?`) on a session of `$store`'s pool within the operation time limit,
/// for reads outside a transaction; or of `$pool` within `$limit`, for
/// the node's own statements off any request's path. A body that ends,
/// even in an error, has its answers in; the pool's own test on release
/// deals with a connection the error broke.
macro_rules! on_session {
    ($store:expr, |$conn:ident| $body:expr) => {{
        let store = &$store;
        crate::session::on_session!(&store.pool, store.node.operation_timeout, |$conn| $body)
    }};
    ($pool:expr, $limit:expr, |$conn:ident| $body:expr) => {{
        let pool: &sqlx::postgres::PgPool = $pool;
        crate::session::within($limit, async {
            let mut session = crate::session::Session::acquire(pool)
                .await
                .map_err(crate::rows::PgError::Core)?;
            let outcome = async {
                let $conn: &mut sqlx::postgres::PgConnection = &mut session;
                Ok::<_, crate::rows::PgError>($body)
            }
            .await;
            session.settle();
            outcome
        })
        .await
        .map_err(crate::rows::PgError::into_core)
    }};
}
pub(crate) use on_session;

/// Opens a transaction on a session of `pool`.
pub(crate) async fn begin(pool: &PgPool) -> PgResult<Session> {
    let mut session = Session::acquire(pool).await.map_err(PgError::Core)?;
    // A statement without parameters goes by the simple protocol, in one
    // round trip, as sqlx's own transactions begin.
    sqlx::Executor::execute(&mut *session as &mut PgConnection, "BEGIN").await?;
    Ok(session)
}

/// Ends `session`'s transaction with `statement` (COMMIT or ROLLBACK); the
/// session settles only if the server answered that it did.
pub(crate) async fn end(session: &mut Session, statement: &'static str) -> PgResult<()> {
    sqlx::Executor::execute(&mut **session as &mut PgConnection, statement).await?;
    session.settle();
    Ok(())
}
