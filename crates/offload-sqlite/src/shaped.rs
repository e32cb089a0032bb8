//! Prepared statements found by their shape, not their text.
//!
//! The statements that take many rows at once (inserts, claims' reads, row
//! write-backs) have a text per row count, and the write-backs one per set
//! of columns that differ between their rows: texts of up to a few
//! kilobytes. rusqlite's `prepare_cached` finds a statement by hashing its
//! whole text, twice a use, and clears its bindings when it goes back:
//! ~12% of the writer's work for a batch enqueue (callgrind). Here a
//! statement is found by a small key, and its text is built only the first
//! time.

use rusqlite::{Connection, Statement};
use rustc_hash::FxHashMap;

/// What decides a statement's text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Shape {
    /// `sql::insert_plain_rows(rows, shared)`.
    InsertRows { rows: usize, shared: u16 },
    /// `sql::tasks_by_seq(rows)`.
    TasksBySeq(usize),
    /// A write-back of `rows` rows (none for a range that sets every row
    /// alike); bit `c` of `varies` is set when column `c` differs between
    /// them, `or_fail` when none holds a unique key, and `select` says how
    /// it names them (`row_writes.rs`).
    WriteRows {
        rows: usize,
        varies: u16,
        or_fail: bool,
        select: crate::row_writes::Select,
    },
}

/// Past this many shapes, the statements are dropped and prepared again as
/// they come: write-backs' column sets could in principle be many.
const MAX_SHAPES: usize = 256;

/// The statements of one connection by shape.
pub(crate) struct ShapedStatements<'conn> {
    conn: &'conn Connection,
    statements: FxHashMap<Shape, Statement<'conn>>,
}

impl<'conn> ShapedStatements<'conn> {
    pub fn new(conn: &'conn Connection) -> Self {
        Self {
            conn,
            statements: FxHashMap::default(),
        }
    }

    /// The statement of `shape`, prepared from `text` if it is new. Its
    /// parameters may still hold the last use's values: a caller binds
    /// every one.
    pub fn get(
        &mut self,
        shape: Shape,
        text: impl FnOnce() -> String,
    ) -> rusqlite::Result<&mut Statement<'conn>> {
        if !self.statements.contains_key(&shape) {
            if self.statements.len() >= MAX_SHAPES {
                self.statements.clear();
            }
            let statement = self.conn.prepare(&text())?;
            self.statements.insert(shape, statement);
        }
        Ok(self
            .statements
            .get_mut(&shape)
            .expect("the statement was just prepared"))
    }

    /// The shapes prepared so far.
    #[cfg(test)]
    pub fn shapes(&self) -> impl Iterator<Item = &Shape> {
        self.statements.keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shape_is_prepared_once_and_shapes_past_the_bound_start_over() {
        let conn = Connection::open_in_memory().unwrap();
        let mut shaped = ShapedStatements::new(&conn);
        let mut built = 0;
        for _ in 0..3 {
            let stmt = shaped
                .get(Shape::InsertRows { rows: 8, shared: 0 }, || {
                    built += 1;
                    "SELECT 8".into()
                })
                .unwrap();
            assert_eq!(stmt.query_row([], |r| r.get::<_, i64>(0)).unwrap(), 8);
        }
        assert_eq!(built, 1);
        for rows in 0..MAX_SHAPES {
            shaped
                .get(Shape::TasksBySeq(rows), || format!("SELECT {rows}"))
                .unwrap();
        }
        assert!(shaped.statements.len() <= MAX_SHAPES);
        let stmt = shaped
            .get(Shape::TasksBySeq(3), || "SELECT 3".into())
            .unwrap();
        assert_eq!(stmt.query_row([], |r| r.get::<_, i64>(0)).unwrap(), 3);
    }
}
