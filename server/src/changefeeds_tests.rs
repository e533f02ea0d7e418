//! The manager without running a changefeed: admin-state persistence, and
//! every command and route answered while PD is unreachable (so no job
//! ever starts).

use http_body_util::BodyExt;
use hyper::Method;

use super::*;
use crate::shutdown::Shutdown;

fn table(id: &str) -> ChangefeedConfig {
    let text = format!("[[changefeed]]\nid = {id:?}\nsink = \"file:///nowhere/{id}\"\n");
    let mut cfg = crate::config::Config::parse(&text).expect("parses");
    cfg.changefeed.remove(0)
}

#[test]
fn admin_state_round_trips_and_defaults_to_active() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("changefeeds").join("a");
    assert_eq!(load_admin_state(&dir).expect("missing"), AdminState::Active);
    for state in [AdminState::Paused, AdminState::Removed, AdminState::Active] {
        store_admin_state(&dir, state).expect("store");
        assert_eq!(load_admin_state(&dir).expect("load"), state);
    }
    let names: Vec<_> = std::fs::read_dir(&dir)
        .expect("dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(
        names,
        vec![std::ffi::OsString::from(ADMIN_FILE)],
        "no tmp left"
    );
    let text = std::fs::read_to_string(dir.join(ADMIN_FILE)).expect("read");
    assert_eq!(text, r#"{"state":"active"}"#);

    std::fs::write(dir.join(ADMIN_FILE), b"{torn").expect("write");
    assert!(load_admin_state(&dir).is_err());
}

#[test]
fn stored_admin_states_are_loaded_and_unreadable_ones_pause() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let base = tmp.path().join("changefeeds");
    store_admin_state(&base.join("paused"), AdminState::Paused).expect("store");
    store_admin_state(&base.join("removed"), AdminState::Removed).expect("store");
    std::fs::create_dir_all(base.join("torn")).expect("mkdir");
    std::fs::write(base.join("torn").join(ADMIN_FILE), b"?").expect("write");
    let tables: Vec<_> = ["fresh", "paused", "removed", "torn"]
        .into_iter()
        .map(table)
        .collect();
    let manager = Manager::new(&tables, tmp.path());
    let state = |id: &str| {
        let job = &manager.jobs[id];
        (job.admin, job.status.snapshot().state)
    };
    assert_eq!(state("fresh"), (AdminState::Active, State::Starting));
    assert_eq!(state("paused"), (AdminState::Paused, State::Paused));
    assert_eq!(state("removed"), (AdminState::Removed, State::Stopped));
    assert_eq!(state("torn"), (AdminState::Paused, State::Paused));
    let torn = manager.jobs["torn"].status.snapshot();
    assert!(torn.last_error.is_some_and(|e| e.contains(ADMIN_FILE)));
    assert!(manager.jobs.values().all(|j| j.run.is_none()));
}

#[test]
fn ids_come_from_the_query() {
    assert_eq!(
        id_param(Some("id=orders-1")).ok(),
        Some("orders-1".to_owned())
    );
    for bad in [
        None,
        Some(""),
        Some("id=a&id=b"),
        Some("x=1"),
        Some("id=a/b"),
        Some("id"),
    ] {
        let reply = id_param(bad).expect_err("refused");
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{bad:?}");
    }
}

struct Harness {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    routes: StatusRoutes,
    shutdown: Shutdown,
    task: JoinHandle<()>,
}

/// A manager whose PD never answers (nothing listens on port 1), so no
/// job is started whatever the commands.
fn harness(ids: &[&str], seeded: &[(&str, AdminState)]) -> Harness {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_path_buf();
    for (id, state) in seeded {
        store_admin_state(&dir.join("changefeeds").join(id), *state).expect("seed");
    }
    let tables: Vec<_> = ids.iter().copied().map(table).collect();
    let shutdown = Shutdown::new();
    let (handle, task) = start(
        &tables,
        &dir,
        "127.0.0.1:1".to_owned(),
        shutdown.subscribe(),
    );
    Harness {
        _tmp: tmp,
        dir,
        routes: routes(StatusRoutes::new(), &handle),
        shutdown,
        task,
    }
}

impl Harness {
    async fn call(&self, method: Method, path: &str, query: Option<&str>) -> (u16, String) {
        let response = self.routes.handle(&method, path, query).await;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    async fn post(&self, path: &str, id: &str) -> (u16, String) {
        self.call(Method::POST, path, Some(&format!("id={id}")))
            .await
    }

    fn stored(&self, id: &str) -> AdminState {
        load_admin_state(&self.dir.join("changefeeds").join(id)).expect("load")
    }

    async fn stop(self) {
        self.shutdown.trigger();
        tokio::time::timeout(JOB_STOP_GRACE * 2, self.task)
            .await
            .expect("the manager stops")
            .expect("no panic");
    }
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

#[tokio::test]
async fn commands_answer_and_persist_without_running_anything() {
    let h = harness(&["a", "b", "gone"], &[("gone", AdminState::Removed)]);

    let (code, body) = h.call(Method::GET, "/changefeeds", None).await;
    assert_eq!(code, 200, "{body}");
    let list = json(&body);
    let ids: Vec<_> = list
        .as_array()
        .expect("array")
        .iter()
        .map(|j| j["id"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(ids, ["a", "b", "gone"]);
    assert_eq!(list[0]["admin_state"], "active");
    assert_eq!(list[0]["state"], "starting");
    assert_eq!(list[0]["sink"], "file:///nowhere/a");
    assert!(list[0]["lag_ms"].is_null(), "no checkpoint yet");
    assert_eq!(list[2]["admin_state"], "removed");

    let (code, body) = h
        .call(Method::GET, "/changefeeds/status", Some("id=b"))
        .await;
    assert_eq!((code, json(&body)["id"].as_str()), (200, Some("b")));
    let (code, body) = h
        .call(Method::GET, "/changefeeds/status", Some("id=zz"))
        .await;
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("\"zz\""), "{body}");
    let (code, _) = h.call(Method::GET, "/changefeeds/status", None).await;
    assert_eq!(code, 400);
    let (code, _) = h
        .call(Method::GET, "/changefeeds/pause", Some("id=a"))
        .await;
    assert_eq!(code, 405, "changes are POST only");

    // Pause: persisted, and idempotent.
    for _ in 0..2 {
        let (code, body) = h.post("/changefeeds/pause", "a").await;
        assert_eq!(code, 200, "{body}");
        let view = json(&body);
        assert_eq!(
            (view["state"].as_str(), view["admin_state"].as_str()),
            (Some("paused"), Some("paused"))
        );
    }
    assert_eq!(h.stored("a"), AdminState::Paused);
    assert_eq!(h.post("/changefeeds/pause", "nope").await.0, 404);

    // Resume: active again (it would start once PD answers).
    let (code, body) = h.post("/changefeeds/resume", "a").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["admin_state"], "active");
    assert_eq!(h.stored("a"), AdminState::Active);
    assert_eq!(
        h.post("/changefeeds/resume", "a").await.0,
        200,
        "idempotent"
    );

    // A removed one cannot be resumed or paused; removing it again is fine.
    let (code, body) = h.post("/changefeeds/resume", "gone").await;
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("removed"), "{body}");
    assert_eq!(h.post("/changefeeds/pause", "gone").await.0, 409);
    assert_eq!(h.post("/changefeeds/remove", "gone").await.0, 200);

    // Removing needs PD (to delete the service safe point): refused, and
    // nothing changed.
    let (code, body) = h.post("/changefeeds/remove", "b").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("safe point"), "{body}");
    assert_eq!(h.stored("b"), AdminState::Active);

    h.stop().await;
}

#[tokio::test]
async fn a_stopped_manager_answers_unavailable() {
    let h = harness(&["a"], &[]);
    let routes = h.routes.clone();
    h.stop().await;
    let response = routes.handle(&Method::GET, "/changefeeds", None).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
}
