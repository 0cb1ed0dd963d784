//! The registry in PostgreSQL (`--database postgres://…`): the only user of
//! the `postgres` crate. The registry's log lines ([`super::registry`]) go
//! into one table, `registry_log (seq, op)`, instead of `stateFile.log`;
//! every replica replays the table into memory at start and then reads
//! through: before it answers from memory it fetches the lines written
//! since (`seq > last`), so the fleet view of every replica agrees.
//!
//! Writes are serialized across replicas by one transaction-scoped advisory
//! lock ([`WRITE_LOCK`]): under it a replica catches up, decides (a new
//! node's token, a rollout's expected revision), appends its line and
//! commits. So two replicas can neither give out one name's token twice nor
//! both advance a rollout step, and `seq` becomes visible in order (each
//! line is committed before the next is numbered), which is what makes
//! `seq > last` lose nothing.
//!
//! The schema is bin-manager's own: [`MIGRATIONS`], applied in order in one
//! transaction under the advisory lock [`MIGRATE_LOCK`] and recorded in
//! `schema_migrations`, so two replicas starting at once apply each once.
//!
//! One connection per replica (every statement runs under the registry's
//! lock anyway), connected again on the next use after it broke; a query
//! that fails is [`Error::Database`], which routes answer 503.

use crate::error::{Error, Result};
use std::str::FromStr;
use std::time::Duration;

/// The advisory lock key that serializes registry writes (an arbitrary
/// constant: "bin-mgr1" in ASCII).
const WRITE_LOCK: i64 = 0x6269_6e2d_6d67_7231;
/// The advisory lock key that serializes migrations ("bin-mgr2").
const MIGRATE_LOCK: i64 = 0x6269_6e2d_6d67_7232;
/// How long connecting may take before the database counts as down.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The schema, by version; never edit one that shipped, add the next.
const MIGRATIONS: &[(i32, &str)] = &[(
    1,
    "CREATE TABLE registry_log (
        seq bigserial PRIMARY KEY,
        op text NOT NULL,
        written_at timestamptz NOT NULL DEFAULT now()
    )",
)];

/// A connection to bin-manager's database.
pub struct Database {
    config: postgres::Config,
    /// Shown in errors and logs, without a password.
    shown: String,
    client: Option<postgres::Client>,
}

impl Database {
    /// Connects to `url` and brings the schema up to date.
    pub fn open(url: &str) -> Result<Database> {
        let mut config = postgres::Config::from_str(url).map_err(|e| Error::Config {
            path: "--database".into(),
            msg: format!("invalid PostgreSQL URL: {e}"),
        })?;
        config.connect_timeout(CONNECT_TIMEOUT);
        config.application_name("bin-manager");
        let shown = match url.split_once('@') {
            Some((_, host)) => format!("postgres://…@{host}"),
            None => url.to_string(),
        };
        let mut db = Database {
            config,
            shown,
            client: None,
        };
        let applied = db.migrate()?;
        if applied > 0 {
            crate::info!(
                "database {}: applied {applied} schema migration(s)",
                db.shown
            );
        }
        Ok(db)
    }

    /// Where the database is (no password), for logs.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// Applies the migrations not yet recorded; how many it applied.
    fn migrate(&mut self) -> Result<usize> {
        let client = self.client()?;
        let mut tx = client.transaction().map_err(db("beginning a migration"))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK])
            .map_err(db("locking the schema"))?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                version integer PRIMARY KEY,
                applied_at timestamptz NOT NULL DEFAULT now()
            )",
        )
        .map_err(db("creating schema_migrations"))?;
        let done: Vec<i32> = tx
            .query("SELECT version FROM schema_migrations", &[])
            .map_err(db("reading schema_migrations"))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let mut applied = 0;
        for (version, sql) in MIGRATIONS {
            if done.contains(version) {
                continue;
            }
            tx.batch_execute(sql)
                .map_err(|e| Error::Database(format!("applying migration {version}: {e}")))?;
            tx.execute(
                "INSERT INTO schema_migrations (version) VALUES ($1)",
                &[version],
            )
            .map_err(db("recording a migration"))?;
            applied += 1;
        }
        tx.commit().map_err(db("committing the migrations"))?;
        Ok(applied)
    }

    /// The log lines after `after`, in order: `(seq, op)`.
    pub fn since(&mut self, after: i64) -> Result<Vec<(i64, String)>> {
        let rows = self
            .client()?
            .query(
                "SELECT seq, op FROM registry_log WHERE seq > $1 ORDER BY seq",
                &[&after],
            )
            .map_err(db("reading the registry log"));
        let rows = self.forget_if_broken(rows)?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Appends one line, serialized with every replica's writes: locks,
    /// passes the lines written since `after` to `decide` (which applies
    /// them and returns the line to write, or `None` for nothing), writes
    /// it and commits. Returns the last seq seen or written.
    pub fn append(
        &mut self,
        after: i64,
        decide: impl FnOnce(Vec<(i64, String)>) -> Option<String>,
    ) -> Result<i64> {
        let result = (|| {
            let client = self.client()?;
            let mut tx = client.transaction().map_err(db("beginning a write"))?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])
                .map_err(db("locking the registry"))?;
            let rows = tx
                .query(
                    "SELECT seq, op FROM registry_log WHERE seq > $1 ORDER BY seq",
                    &[&after],
                )
                .map_err(db("reading the registry log"))?;
            let lines: Vec<(i64, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
            let mut last = lines.last().map_or(after, |l| l.0);
            if let Some(op) = decide(lines) {
                last = tx
                    .query_one(
                        "INSERT INTO registry_log (op) VALUES ($1) RETURNING seq",
                        &[&op],
                    )
                    .map_err(db("appending to the registry log"))?
                    .get(0);
            }
            tx.commit().map_err(db("committing a registry write"))?;
            Ok(last)
        })();
        self.forget_if_broken(result)
    }

    /// The open connection, connecting when there is none.
    fn client(&mut self) -> Result<&mut postgres::Client> {
        if self.client.as_ref().is_some_and(|c| c.is_closed()) {
            self.client = None;
        }
        if self.client.is_none() {
            let client = self
                .config
                .connect(postgres::NoTls)
                .map_err(|e| Error::Database(format!("cannot connect to {}: {e}", self.shown)))?;
            self.client = Some(client);
        }
        // Set just above.
        Ok(self.client.as_mut().expect("connected"))
    }

    /// Drops the connection after an error, so the next use connects anew.
    fn forget_if_broken<T>(&mut self, r: Result<T>) -> Result<T> {
        if r.is_err() {
            self.client = None;
        }
        r
    }
}

/// Maps a driver error to [`Error::Database`], saying what was being done.
fn db(doing: &'static str) -> impl Fn(postgres::Error) -> Error {
    move |e| Error::Database(format!("{doing}: {e}"))
}
