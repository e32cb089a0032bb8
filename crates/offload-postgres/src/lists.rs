//! Pages of `GET /v1/tasks`: rounds of rows newest first, and, for lists
//! with label filters, the labels' own index where the labels are rare.
//!
//! No index holds tasks by label in seq order. Walked newest first, a
//! list of a rare label read every task without it: 18 ms a page for 100
//! tasks behind 100,000 others, ten times that behind a million.
//! `offload_tasks_labels` (GIN) finds a label's tasks in no order, at a
//! cost that grows with how many bear it. So a list with labels walks
//! windows of the newest [`crate::sql::LABEL_WALK`] tasks while each
//! brings enough of the page, and past those reads the index: the
//! labels' tasks newest first, a round at a time, each checked against
//! the other filters by primary key.

use std::collections::VecDeque;

use futures::TryStreamExt;
use offload_core::{ListQuery, PageFill};
use sqlx::postgres::PgConnection;
use sqlx::{Postgres, QueryBuilder};

use crate::rows::{PgError, PgResult, StoredTask, decode};
use crate::sql::{
    LABELLED_ROUND, labelled_below, list_newest_for_labels, list_tasks, listed_among,
};

/// The page of tasks `query` lists below seq `below`, and whether
/// another page follows.
///
/// Rows are taken as they arrive, so that a page that fills up on bytes
/// stops there; the first row it has no room for tells that another page
/// follows. They are asked for in rounds sized by what the page has room
/// for: rows past the page are still sent by PostgreSQL and read off the
/// connection, a gigabyte a page for tasks of the largest payloads if
/// every page asked for `limit`.
pub(crate) async fn page(
    conn: &mut PgConnection,
    query: &ListQuery,
    mut below: Option<i64>,
    owner_first: bool,
) -> PgResult<(Vec<StoredTask>, bool)> {
    let mut page = PageFill::new(query.limit);
    let mut tasks = Vec::new();
    loop {
        let asked = page.rows_to_ask();
        let mut sql = list_tasks(query, below, asked, owner_first);
        let mut rows = sql.build().fetch(&mut *conn);
        let mut sent = 0;
        while let Some(row) = rows.try_next().await? {
            sent += 1;
            let stored = decode(&row)?;
            if !page.take(&stored.task) {
                return Ok((tasks, true));
            }
            below = Some(stored.seq);
            tasks.push(stored);
        }
        if sent < asked {
            return Ok((tasks, false));
        }
    }
}

/// [`page`] for a `query` with label filters.
pub(crate) async fn labelled_page(
    conn: &mut PgConnection,
    query: &ListQuery,
    mut below: Option<i64>,
    owner_first: bool,
) -> PgResult<(Vec<StoredTask>, bool)> {
    let mut page = PageFill::new(query.limit);
    let mut tasks = Vec::new();
    // Windows of the newest tasks, while each brings an eighth of what
    // the page asks for at least: a label that common fills the page
    // within eight windows. A rarer one is read from its index.
    loop {
        let asked = page.rows_to_ask();
        let newest = tasks_of(
            conn,
            list_newest_for_labels(query, below, asked, owner_first),
        )
        .await?;
        let found = newest.len();
        for stored in newest {
            if !page.take(&stored.task) {
                return Ok((tasks, true));
            }
            below = Some(stored.seq);
            tasks.push(stored);
        }
        if found < (asked / 8).max(1) {
            break;
        }
    }
    // The labels' tasks below the last one found, from the index, newest
    // first, a round at a time (`None` once the last round came short).
    let mut index_below = Some(below);
    let mut candidates = VecDeque::new();
    loop {
        if candidates.is_empty() {
            let Some(from) = index_below else {
                return Ok((tasks, false));
            };
            let labelled: Vec<i64> = labelled_below(&query.labels, from, LABELLED_ROUND)
                .build_query_scalar()
                .fetch_all(&mut *conn)
                .await?;
            index_below = (labelled.len() == LABELLED_ROUND).then(|| labelled.last().copied());
            if labelled.is_empty() {
                return Ok((tasks, false));
            }
            candidates.extend(labelled);
        }
        let asked = page.rows_to_ask().min(candidates.len());
        let among: Vec<i64> = candidates.drain(..asked).collect();
        let mut rows = tasks_of(conn, listed_among(query, among)).await?;
        rows.sort_unstable_by_key(|stored| std::cmp::Reverse(stored.seq));
        for stored in rows {
            if !page.take(&stored.task) {
                return Ok((tasks, true));
            }
            tasks.push(stored);
        }
    }
}

/// Every task `sql` reads.
async fn tasks_of(
    conn: &mut PgConnection,
    mut sql: QueryBuilder<'static, Postgres>,
) -> PgResult<Vec<StoredTask>> {
    sql.build()
        .fetch(conn)
        .map_err(PgError::from)
        .and_then(|row| async move { Ok(decode(&row)?) })
        .try_collect()
        .await
}
