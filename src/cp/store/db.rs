//! [`Db`], the one database handle of the store: a connection (or a
//! transaction, which derefs to one) together with the file's path, so
//! every error names the database and what was being done. The helpers
//! that turn failures into [`StoreError`]s live here and nowhere else.

use std::path::Path;

use rusqlite::Connection;

use super::StoreError;

/// A connection or transaction and the path of its database file.
#[derive(Clone, Copy)]
pub(crate) struct Db<'a> {
    conn: &'a Connection,
    path: &'a Path,
}

impl std::fmt::Debug for Db<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db").field("path", &self.path).finish()
    }
}

impl<'a> Db<'a> {
    pub(crate) fn new(conn: &'a Connection, path: &'a Path) -> Db<'a> {
        Db { conn, path }
    }

    pub(crate) fn conn(self) -> &'a Connection {
        self.conn
    }

    /// Maps a rusqlite error of operation `op` (e.g. "load dispatches").
    pub(crate) fn sql(self, op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError + 'a {
        sql_error(self.path, op)
    }

    /// Every row of `sql` through `map`: prepare, query and collect, each
    /// failure named by `op` (e.g. "load quarantine"). Not the statement
    /// cache: these are reads done once, and the writer's cache holds its
    /// hot statements.
    pub(crate) fn rows<T, P: rusqlite::Params>(
        self,
        op: &'static str,
        sql: &str,
        params: P,
        map: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Vec<T>, StoreError> {
        let mut stmt = self.conn.prepare(sql).map_err(self.sql(op))?;
        let rows = stmt.query_map(params, map).map_err(self.sql(op))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(self.sql(op))
    }

    /// Data read back that this version cannot make sense of.
    pub(crate) fn corrupt(self, what: impl Into<String>) -> StoreError {
        StoreError::Corrupt { path: self.path.to_owned(), what: what.into() }
    }

    /// JSON for a database column. Serialising plain data does not fail in
    /// practice, but if it ever did, an empty string in the event log would
    /// break every later replay: the group fails instead (503, agents retry).
    pub(crate) fn json<T: serde::Serialize + ?Sized>(
        self,
        what: impl FnOnce() -> String,
        value: &T,
    ) -> Result<String, StoreError> {
        serde_json::to_string(value).map_err(|source| StoreError::Encode {
            path: self.path.to_owned(),
            what: what(),
            source,
        })
    }

    /// A count or seq as a database integer: refused, never wrapped.
    pub(crate) fn int<T: TryInto<i64> + TryInto<u64> + Copy>(
        self,
        what: &'static str,
        value: T,
    ) -> Result<i64, StoreError> {
        <T as TryInto<i64>>::try_into(value).map_err(|_| StoreError::OutOfRange {
            path: self.path.to_owned(),
            what,
            value: <T as TryInto<u64>>::try_into(value).unwrap_or(u64::MAX),
        })
    }
}

/// A row of two text columns, for [`Db::rows`].
pub(crate) fn two_texts(r: &rusqlite::Row<'_>) -> rusqlite::Result<(String, String)> {
    Ok((r.get(0)?, r.get(1)?))
}

/// [`Db::sql`] before there is a connection (opening the file).
pub(crate) fn sql_error<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError + 'a {
    move |source| StoreError::Sql { path: path.to_owned(), op, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_db(f: impl FnOnce(Db<'_>)) {
        let conn = Connection::open_in_memory().expect("in-memory database");
        f(Db::new(&conn, Path::new("/db")));
    }

    /// A value that cannot be serialised is an error naming it, never the
    /// empty string the event log used to get (the log is the replay source).
    #[test]
    fn unencodable_json_is_an_error_not_an_empty_row() {
        struct Unencodable;
        impl serde::Serialize for Unencodable {
            fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
                Err(serde::ser::Error::custom("no JSON for this"))
            }
        }
        with_db(|db| {
            let err = db.json(|| "event seq 3 of web-1".to_owned(), &Unencodable).expect_err("must not produce a row");
            assert!(err.to_string().contains("event seq 3 of web-1") && err.to_string().contains("no JSON"), "{err}");
            assert_eq!(db.json(String::new, &7u8).expect("plain data"), "7");
        });
    }

    /// Numbers beyond SQLite's INTEGER are refused with the field's name,
    /// never wrapped to negative values.
    #[test]
    fn numbers_beyond_i64_are_refused_not_wrapped() {
        with_db(|db| {
            assert_eq!(db.int("seq", i64::MAX as u64).expect("fits"), i64::MAX);
            let err = db.int("seq", i64::MAX as u64 + 1).expect_err("too large");
            assert!(err.to_string().contains("seq = 9223372036854775808"), "{err}");
            assert_eq!(db.int("wave", 3usize).expect("fits"), 3);
        });
    }
}
