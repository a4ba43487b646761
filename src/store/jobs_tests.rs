use serde_json::json;

use super::*;

fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    (dir, store)
}

fn job_row(id: &str, created_at: i64, status: &str) -> JobRow {
    JobRow {
        id: id.into(),
        created_at,
        status: status.into(),
        body: json!({"id": id, "object": "fine_tuning.job", "status": status}),
    }
}

fn event_row(job: &str, n: i64) -> EventRow {
    EventRow {
        id: format!("ftevent-{job}-{n}"),
        job_id: job.into(),
        created_at: 100 + n,
        level: "info".into(),
        message: format!("step {n}"),
        data: (n % 2 == 0).then(|| json!({"step": n})),
    }
}

#[test]
fn jobs_insert_update_get_and_page_newest_first() {
    let (_dir, store) = store();
    for (id, t) in [("j1", 1), ("j2", 2), ("j3", 2), ("j4", 3)] {
        store.insert_job(&job_row(id, t, "queued")).unwrap();
    }
    let body = json!({"id": "j2", "status": "running", "trained_tokens": 7});
    store.update_job("j2", "running", &body).unwrap();
    let j = store.get_job("j2").unwrap();
    assert_eq!((j.status.as_str(), &j.body), ("running", &body));
    assert!(matches!(store.update_job("nope", "x", &body), Err(StoreError::NotFound { .. })));
    assert!(matches!(store.get_job("nope"), Err(StoreError::NotFound { .. })));

    let ids = |p: &Page<JobRow>| p.data.iter().map(|j| j.id.clone()).collect::<Vec<_>>();
    let p = store.list_jobs(None, 2).unwrap();
    assert_eq!((ids(&p), p.has_more), (vec!["j4".to_string(), "j3".into()], true));
    let p = store.list_jobs(Some("j3"), 2).unwrap();
    assert_eq!((ids(&p), p.has_more), (vec!["j2".to_string(), "j1".into()], false));
    assert!(matches!(store.list_jobs(Some("nope"), 2), Err(StoreError::UnknownCursor { .. })));

    let resumable = store.jobs_with_status(&["queued", "running"]).unwrap();
    assert_eq!(resumable.len(), 4);
    assert_eq!(store.jobs_with_status(&["running"]).unwrap()[0].id, "j2");
}

#[test]
fn events_page_newest_first_and_read_oldest_first() {
    let (_dir, store) = store();
    store.insert_job(&job_row("j", 1, "running")).unwrap();
    store.insert_job(&job_row("k", 1, "running")).unwrap();
    for n in 1..=5 {
        store.append_event(&event_row("j", n)).unwrap();
    }
    store.append_event(&event_row("k", 1)).unwrap();
    let msgs = |v: &[EventRow]| v.iter().map(|e| e.message.clone()).collect::<Vec<_>>();
    let p = store.list_events("j", None, 2).unwrap();
    assert_eq!(msgs(&p.data), ["step 5", "step 4"]);
    assert!(p.has_more);
    let p = store.list_events("j", Some(&p.data[1].id), 10).unwrap();
    assert_eq!(msgs(&p.data), ["step 3", "step 2", "step 1"]);
    assert!(!p.has_more);
    let all = store.all_events("j").unwrap();
    assert_eq!(msgs(&all), ["step 1", "step 2", "step 3", "step 4", "step 5"]);
    assert_eq!(all[1].data, Some(json!({"step": 2})));
    assert_eq!(all[0].data, None);
    // Another job's event is not a cursor for this one.
    let other = event_row("k", 1).id;
    assert!(matches!(
        store.list_events("j", Some(&other), 1),
        Err(StoreError::UnknownCursor { .. })
    ));
    // Event ids are unique; events need an existing job.
    assert!(store.append_event(&event_row("j", 1)).is_err());
    assert!(store.append_event(&event_row("missing", 9)).is_err());
}

#[test]
fn checkpoints_list_latest_step_first() {
    let (_dir, store) = store();
    store.insert_job(&job_row("j", 1, "running")).unwrap();
    for step in [10, 20, 30] {
        store
            .insert_checkpoint(&CheckpointRow {
                id: format!("ftckpt-{step}"),
                job_id: "j".into(),
                step,
                created_at: step,
                metrics: json!({"step": step, "train_loss": 1.5}),
                path: format!("blobs/checkpoints/j/{step}"),
                fine_tuned_model_checkpoint: format!("ft:m:o::j:ckpt-step-{step}"),
            })
            .unwrap();
    }
    let p = store.list_checkpoints("j", None, 2).unwrap();
    assert_eq!(p.data.iter().map(|c| c.step).collect::<Vec<_>>(), [30, 20]);
    assert!(p.has_more);
    assert_eq!(p.data[0].metrics["train_loss"], 1.5);
    let p = store.list_checkpoints("j", Some("ftckpt-20"), 2).unwrap();
    assert_eq!(p.data.iter().map(|c| c.step).collect::<Vec<_>>(), [10]);
    assert!(!p.has_more);
}

#[test]
fn fine_tuned_models_crud() {
    let (_dir, store) = store();
    store.insert_job(&job_row("j", 1, "succeeded")).unwrap();
    let m = ModelRow {
        id: "ft:base:org:x:j".into(),
        parent: "base".into(),
        created_at: 5,
        owned_by: "org".into(),
        job_id: Some("j".into()),
        adapter_path: "blobs/adapters/j".into(),
    };
    store.insert_model(&m).unwrap();
    assert_eq!(store.get_model(&m.id).unwrap(), m);
    assert_eq!(store.list_models().unwrap(), vec![m.clone()]);
    assert_eq!(store.delete_model(&m.id).unwrap(), m);
    assert!(store.list_models().unwrap().is_empty());
    assert!(matches!(store.get_model(&m.id), Err(StoreError::NotFound { .. })));
    assert!(matches!(store.delete_model(&m.id), Err(StoreError::NotFound { .. })));
}
