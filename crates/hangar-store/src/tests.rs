//! The store against a real SQLite database in a temporary directory.

use serde_json::json;

use super::*;

async fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("hangar.db")).await.unwrap();
    (dir, store)
}

fn image(id: &str, name: Option<&str>) -> ImageRow {
    ImageRow {
        id: id.into(),
        name: name.map(Into::into),
        layout: format!("/data/images/{id}"),
        config: json!({"cmd": ["python3", "agent.py"]}),
        created_at: "2026-11-27T00:00:00Z".into(),
    }
}

fn session(id: &str, key: &str, last: &str) -> SessionRow {
    SessionRow {
        id: id.into(),
        agent: "notes".into(),
        version: 1,
        isolation_key: key.into(),
        state: "running".into(),
        sandbox_id: Some(format!("sb-{id}")),
        created_at: last.into(),
        last_activity: last.into(),
        checkpoint: None,
        error: None,
    }
}

#[test]
fn rescaling_keeps_proportions_and_sums() {
    let check = |mut split: Vec<(i64, i64)>, total: i64, expect: Vec<(i64, i64)>| {
        rescale(&mut split, total);
        assert_eq!(split, expect);
    };
    check(vec![(1, 100)], 90, vec![(1, 90)]);
    check(vec![(1, 50), (2, 50)], 90, vec![(1, 45), (2, 45)]);
    check(
        vec![(1, 1), (2, 1), (3, 1)],
        100,
        vec![(1, 34), (2, 33), (3, 33)],
    );
    check(vec![(1, 0), (2, 0)], 100, vec![(1, 0), (2, 100)]);
    check(vec![], 100, vec![]);
}

#[tokio::test]
async fn deploys_number_versions_and_split_traffic() {
    let (_dir, s) = store().await;
    s.put_image(&image("sha256:a", Some("notes:1")))
        .await
        .unwrap();
    let spec = json!({"name": "notes"});
    let v1 = s
        .deploy("notes", "sha256:a", &spec, None, "t1")
        .await
        .unwrap();
    assert_eq!(v1.number, 1);
    assert_eq!(
        s.traffic("notes").await.unwrap(),
        vec![(1, 100)],
        "the first version gets everything"
    );
    let v2 = s
        .deploy("notes", "sha256:a", &spec, None, "t2")
        .await
        .unwrap();
    assert_eq!(v2.number, 2);
    assert_eq!(
        s.traffic("notes").await.unwrap(),
        vec![(1, 100), (2, 0)],
        "later versions start at 0"
    );
    s.deploy("notes", "sha256:a", &spec, Some(10), "t3")
        .await
        .unwrap();
    assert_eq!(
        s.traffic("notes").await.unwrap(),
        vec![(1, 90), (2, 0), (3, 10)]
    );
    s.set_traffic("notes", &[(1, 50), (2, 25), (3, 25)])
        .await
        .unwrap();
    assert_eq!(
        s.traffic("notes").await.unwrap(),
        vec![(1, 50), (2, 25), (3, 25)]
    );
    let versions = s.versions("notes").await.unwrap();
    assert_eq!(
        versions.iter().map(|v| v.number).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert_eq!(versions[0].spec, spec);
}

#[tokio::test]
async fn bad_deploys_and_splits_change_nothing() {
    let (_dir, s) = store().await;
    let e = s
        .deploy("notes", "sha256:missing", &json!({}), None, "t")
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::NoImage(_)) && e.is_user_error());
    assert!(
        s.versions("notes").await.unwrap().is_empty(),
        "a failed deploy left a version"
    );

    s.put_image(&image("sha256:a", None)).await.unwrap();
    s.deploy("notes", "sha256:a", &json!({}), None, "t")
        .await
        .unwrap();
    for bad in [
        vec![(1, 90)],
        vec![(1, 50), (1, 60)],
        vec![(1, 150), (2, -50)],
    ] {
        let e = s.set_traffic("notes", &bad).await.unwrap_err();
        assert!(e.is_user_error(), "{e}");
    }
    let e = s
        .set_traffic("notes", &[(1, 50), (7, 50)])
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::NoVersion { version: 7, .. }), "{e}");
    let e = s.set_traffic("ghost", &[(1, 100)]).await.unwrap_err();
    assert!(matches!(e, StoreError::NoAgent(_)), "{e}");
    assert!(s
        .deploy("notes", "sha256:a", &json!({}), Some(101), "t")
        .await
        .unwrap_err()
        .is_user_error());
    assert_eq!(s.traffic("notes").await.unwrap(), vec![(1, 100)]);
}

#[tokio::test]
async fn image_names_move_like_tags() {
    let (_dir, s) = store().await;
    s.put_image(&image("sha256:a", Some("debian:bookworm")))
        .await
        .unwrap();
    s.put_image(&image("sha256:b", Some("debian:bookworm")))
        .await
        .unwrap();
    assert_eq!(
        s.image("debian:bookworm").await.unwrap().unwrap().id,
        "sha256:b"
    );
    assert_eq!(s.image("sha256:a").await.unwrap().unwrap().name, None);
    assert_eq!(s.images().await.unwrap().len(), 2);
    assert!(s.image("nope").await.unwrap().is_none());
}

#[tokio::test]
async fn sessions_are_visible_to_their_owner_only() {
    let (_dir, s) = store().await;
    s.put_image(&image("sha256:a", None)).await.unwrap();
    s.deploy("notes", "sha256:a", &json!({}), None, "t")
        .await
        .unwrap();
    s.create_session(&session("s1", "alice", "2026-11-27T01:00:00Z"))
        .await
        .unwrap();
    s.create_session(&session("s2", "bob", "2026-11-27T02:00:00Z"))
        .await
        .unwrap();
    assert!(s.session_for("s1", "alice").await.unwrap().is_some());
    assert!(
        s.session_for("s1", "bob").await.unwrap().is_none(),
        "another key sees nothing, like a missing id"
    );
    assert!(s.session_for("s9", "alice").await.unwrap().is_none());
    assert_eq!(s.sessions("notes", Some("bob")).await.unwrap().len(), 1);
    assert_eq!(s.sessions("notes", None).await.unwrap().len(), 2);

    let cp = json!({"mode": "memory", "bytes": 1024});
    s.set_session_state("s1", "suspended", Some("sb-s1"), Some(&cp), None)
        .await
        .unwrap();
    let s1 = s.session("s1").await.unwrap().unwrap();
    assert_eq!((s1.state.as_str(), s1.checkpoint), ("suspended", Some(cp)));

    s.touch_session("s2", "2026-11-27T05:00:00Z").await.unwrap();
    let idle = s
        .idle_sessions("running", "2026-11-27T03:00:00Z")
        .await
        .unwrap();
    assert!(idle.is_empty(), "s2 was touched, s1 is suspended: {idle:?}");

    let k1 = s.session("s1").await.unwrap().unwrap().isolation_key;
    let k2 = s.session("s2").await.unwrap().unwrap().isolation_key;
    assert_ne!(k1, k2);
    s.put_ref("notes", &k1, RefKind::Response, "resp_1", "s1", "t")
        .await
        .unwrap();
    // A response id, once recorded, keeps its session.
    let kept = s
        .put_ref("notes", &k1, RefKind::Response, "resp_1", "s3", "t")
        .await
        .unwrap();
    assert_eq!(kept, "s1");
    s.put_ref("notes", &k2, RefKind::Conversation, "conv_1", "s2", "t")
        .await
        .unwrap();
    assert_eq!(
        s.session_by_ref("notes", &k1, RefKind::Response, "resp_1")
            .await
            .unwrap()
            .as_deref(),
        Some("s1")
    );
    // Another owner's reference does not exist for this one.
    assert_eq!(
        s.session_by_ref("notes", &k2, RefKind::Response, "resp_1")
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        s.session_by_ref("notes", &k1, RefKind::Conversation, "conv_1")
            .await
            .unwrap(),
        None
    );
    assert!(s.delete_session("s1").await.unwrap());
    assert_eq!(
        s.session_by_ref("notes", &k1, RefKind::Response, "resp_1")
            .await
            .unwrap(),
        None,
        "refs go with the session"
    );
    assert!(!s.delete_session("s1").await.unwrap());
}

#[tokio::test]
async fn reopening_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hangar.db");
    {
        let s = Store::open(&path).await.unwrap();
        s.put_image(&image("sha256:a", None)).await.unwrap();
        s.deploy("notes", "sha256:a", &json!({"k": 1}), None, "t")
            .await
            .unwrap();
        s.create_session(&session("s1", "alice", "t"))
            .await
            .unwrap();
    }
    let s = Store::open(&path).await.unwrap();
    assert_eq!(s.versions("notes").await.unwrap().len(), 1);
    assert_eq!(s.traffic("notes").await.unwrap(), vec![(1, 100)]);
    assert!(s.session("s1").await.unwrap().is_some());
}

#[tokio::test]
async fn the_audit_chain_shows_edits_removals_and_moves() {
    let (_dir, s) = store().await;
    for i in 1..=5 {
        let e = AuditEntry {
            actor: "operator".into(),
            action: "session.exec".into(),
            agent: Some("notes".into()),
            session: Some(format!("sess_{}", i % 2)),
            request_id: Some(format!("req_{i}")),
            detail: json!({"n": i}),
        };
        let r = s.append_audit(&e, "2026-11-27T00:00:00Z").await.unwrap();
        assert_eq!(r.seq, i);
    }
    assert_eq!(s.verify_audit().await.unwrap().unwrap().0, 5);
    let f = AuditFilter {
        session: Some("sess_1".into()),
        ..Default::default()
    };
    let listed: Vec<i64> = s.audit(&f).await.unwrap().iter().map(|r| r.seq).collect();
    assert_eq!(listed, [1, 3, 5]);

    let exec = |sql: &'static str| {
        let pool = s.pool.clone();
        async move { sqlx::query(sql).execute(&pool).await.unwrap() }
    };
    // Edited.
    exec("UPDATE audit SET detail = '{\"n\":99}' WHERE seq = 3").await;
    let b = s.verify_audit().await.unwrap().unwrap_err();
    assert_eq!(b.seq, 3);
    assert!(b.problem.contains("edited"), "{b:?}");
    exec("UPDATE audit SET detail = '{\"n\":3}' WHERE seq = 3").await;
    assert!(s.verify_audit().await.unwrap().is_ok());
    // Moved: records 2 and 4 swap places.
    exec("UPDATE audit SET seq = 100 WHERE seq = 2").await;
    exec("UPDATE audit SET seq = 2 WHERE seq = 4").await;
    exec("UPDATE audit SET seq = 4 WHERE seq = 100").await;
    let b = s.verify_audit().await.unwrap().unwrap_err();
    assert_eq!(b.seq, 2, "{b:?}");
    exec("UPDATE audit SET seq = 100 WHERE seq = 2").await;
    exec("UPDATE audit SET seq = 2 WHERE seq = 4").await;
    exec("UPDATE audit SET seq = 4 WHERE seq = 100").await;
    assert!(s.verify_audit().await.unwrap().is_ok());
    // Removed.
    exec("DELETE FROM audit WHERE seq = 4").await;
    let b = s.verify_audit().await.unwrap().unwrap_err();
    assert_eq!(b.seq, 4);
    assert!(b.problem.contains("missing"), "{b:?}");
}
