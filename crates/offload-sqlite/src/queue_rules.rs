//! The queues a claim may not take from freely, kept in the writer's
//! memory: the paused ones and those with a concurrency limit.
//!
//! A claim read every row of `queues` for their settings, and queues are
//! made on first use and never dropped: an application with a queue per
//! customer had each claim read a million rows. Most queues are neither
//! paused nor limited, so only those that are are kept; the rest take the
//! defaults. The writer is the only connection that changes `queues`
//! (`update_queue`), so the rules are read again only after it did, and
//! after a rollback of a transaction in which it did.

use rusqlite::Connection;
use rustc_hash::FxHashMap;

use offload_core::Result;

use crate::rows::storage_error;

/// A queue's settings as a claim sees them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct QueueRule {
    pub paused: bool,
    pub concurrency: Option<i64>,
}

#[derive(Debug, Default)]
pub(crate) struct QueueRules {
    /// The restricted queues' rules, until `queues` changes.
    restricted: Option<FxHashMap<String, QueueRule>>,
    /// Whether the open transaction changed `queues`: rolled back, the
    /// rules read since may hold its changes.
    changed_in_transaction: bool,
}

const RESTRICTED_QUEUES: &str =
    "SELECT name, paused, concurrency FROM queues WHERE paused <> 0 OR concurrency IS NOT NULL";

impl QueueRules {
    /// The rules of the restricted queues; a queue not among them is
    /// neither paused nor limited.
    pub fn restricted(&mut self, conn: &Connection) -> Result<&FxHashMap<String, QueueRule>> {
        if self.restricted.is_none() {
            let mut stmt = conn
                .prepare_cached(RESTRICTED_QUEUES)
                .map_err(storage_error)?;
            let rows = stmt
                .query_map([], |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        QueueRule {
                            paused: row.get(1)?,
                            concurrency: row.get(2)?,
                        },
                    ))
                })
                .map_err(storage_error)?;
            let rules = rows
                .collect::<rusqlite::Result<FxHashMap<_, _>>>()
                .map_err(storage_error)?;
            self.restricted = Some(rules);
        }
        Ok(self.restricted.get_or_insert_default())
    }

    /// Before a change to `queues`.
    pub fn changing(&mut self) {
        self.restricted = None;
        self.changed_in_transaction = true;
    }

    /// After a rollback, of an operation's savepoint or of the whole
    /// transaction.
    pub fn rolled_back(&mut self) {
        if self.changed_in_transaction {
            self.restricted = None;
        }
    }

    /// After the transaction committed.
    pub fn committed(&mut self) {
        self.changed_in_transaction = false;
    }

    /// After the transaction rolled back whole.
    pub fn transaction_rolled_back(&mut self) {
        self.rolled_back();
        self.changed_in_transaction = false;
    }
}

#[cfg(test)]
mod tests {
    use rusqlite::Connection;

    use super::{QueueRule, QueueRules};

    fn paused(rules: &mut QueueRules, conn: &Connection) -> Vec<String> {
        let mut names: Vec<String> = rules
            .restricted(conn)
            .unwrap()
            .iter()
            .filter(|(_, rule)| rule.paused)
            .map(|(name, _)| name.clone())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_rolled_back_change_leaves_the_rules_as_committed() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE queues (name TEXT PRIMARY KEY, paused INTEGER NOT NULL DEFAULT 0, \
             concurrency INTEGER, created_at INTEGER NOT NULL) WITHOUT ROWID;
             INSERT INTO queues VALUES ('free', 0, NULL, 0), ('limited', 0, 3, 0);",
        )
        .unwrap();
        let mut rules = QueueRules::default();
        assert_eq!(
            rules.restricted(&conn).unwrap().get("limited"),
            Some(&QueueRule {
                paused: false,
                concurrency: Some(3)
            })
        );
        assert!(!rules.restricted(&conn).unwrap().contains_key("free"));

        conn.execute_batch("BEGIN").unwrap();
        rules.changing();
        conn.execute_batch("UPDATE queues SET paused = 1 WHERE name = 'free'")
            .unwrap();
        assert_eq!(paused(&mut rules, &conn), ["free"]);
        conn.execute_batch("ROLLBACK").unwrap();
        rules.transaction_rolled_back();
        assert!(paused(&mut rules, &conn).is_empty());

        // Committed, the change stays; a later rollback of a transaction
        // that changed nothing keeps what was read.
        conn.execute_batch("BEGIN").unwrap();
        rules.changing();
        conn.execute_batch("UPDATE queues SET paused = 1 WHERE name = 'free'")
            .unwrap();
        conn.execute_batch("COMMIT").unwrap();
        rules.committed();
        assert_eq!(paused(&mut rules, &conn), ["free"]);
        conn.execute_batch("BEGIN").unwrap();
        rules.rolled_back();
        conn.execute_batch("ROLLBACK").unwrap();
        rules.transaction_rolled_back();
        assert_eq!(paused(&mut rules, &conn), ["free"]);
    }
}
