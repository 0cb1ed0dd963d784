//! The rollouts API: `GET /api/v1/rollouts` (every staged rollout, with
//! its counts), `GET /api/v1/rollouts/NAME[?arch=]`, and
//! `POST /api/v1/rollouts/NAME/pause|resume|promote|abort` (admin token).

use super::{fail, ok, App, Query};
use crate::json::Value;
use crate::manager::http::{Request, Response};
use crate::manager::release;
use crate::manager::rollout::{self, Counts, Rollout, Transition};

impl App {
    /// Records every build moved into binDir since the last look (a new
    /// build starts its rollout here even before an agent asks for it).
    pub fn notice_publishes(&self) {
        for listed in self.store.list() {
            if listed.version.is_some() {
                continue;
            }
            let found = self.releases.resolve(
                &self.store,
                &self.registry,
                &listed.name,
                listed.arch.as_deref(),
                None,
                None,
                false,
                true,
            );
            if let Err(e) = found {
                crate::error!("{}: {e}", listed.name);
            }
        }
    }

    pub(super) fn rollouts(&self) -> Response {
        self.notice_publishes();
        let now = release::now();
        let list = self
            .registry
            .rollouts()
            .into_iter()
            .filter(|r| r.staged)
            .map(|r| self.rollout_json(&r, now));
        ok(Value::Arr(list.collect()))
    }

    pub(super) fn rollout(&self, name: &str, q: &Query) -> Response {
        self.notice_publishes();
        let key = rollout::key(name, q.arch.as_deref());
        match self.registry.rollout(&key).filter(|r| r.staged) {
            Some(r) => ok(self.rollout_json(&r, release::now())),
            None => fail(404, &format!("no staged rollout of {key}")),
        }
    }

    pub(super) fn control(&self, req: &Request, name: &str, q: &Query) -> Response {
        if let Err(resp) = self.check_admin(req, "controlling a rollout") {
            return resp;
        }
        let t = match q.action.as_deref() {
            Some("pause") => Transition::Pause("paused by an operator".into()),
            Some("resume") => Transition::Resume,
            Some("promote") => Transition::Promote,
            Some("abort") => Transition::Abort,
            _ => {
                return fail(
                    404,
                    "use POST /api/v1/rollouts/NAME/pause, resume, promote or abort",
                )
            }
        };
        let key = rollout::key(name, q.arch.as_deref());
        match self.releases.control(&self.registry, &key, &t) {
            Ok(Ok(r)) => ok(self.rollout_json(&r, release::now())),
            Ok(Err(refused)) if self.registry.rollout(&key).is_some_and(|r| r.staged) => {
                fail(409, &refused.0)
            }
            Ok(Err(refused)) => fail(404, &refused.0),
            Err(e) => super::not_stored("the rollout", &e),
        }
    }

    /// A rollout with its counts, as the API and the console show it.
    pub(super) fn rollout_json(&self, r: &Rollout, now: u64) -> Value {
        let Counts {
            eligible,
            on_new,
            succeeded,
            failed,
            pending,
        } = self.releases.count(&self.registry, r, now);
        let mut v = r.to_json();
        if let Value::Obj(entries) = &mut v {
            entries.push((
                "nodes".into(),
                Value::obj([
                    ("eligible", Value::int(eligible)),
                    ("onNew", Value::int(on_new)),
                    ("succeeded", Value::int(succeeded)),
                    ("failed", Value::int(failed)),
                    ("pending", Value::int(pending)),
                ]),
            ));
        }
        v
    }
}
