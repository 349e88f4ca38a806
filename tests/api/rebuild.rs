//! MyPage can be rebuilt from the retained event history: wipe the read
//! model, rebuild, and every view is back as it was; the live projection
//! carries on into the rebuilt table.

use std::time::Duration;

use restaurant_platform::db::{Db, DbOptions};
use serde_json::Value;

use crate::helpers::*;

async fn mypage_db(app: &TestApp) -> Db {
    let url = match &app.config.database_url {
        Some(url) => url.clone(),
        None => format!(
            "sqlite://{}",
            app.config.data_dir.join("mypage.db").display()
        ),
    };
    Db::connect_service(
        &url,
        "mypage",
        &restaurant_mypage::migrations(),
        DbOptions::default(),
    )
    .await
    .unwrap()
}

fn without_projection_time(mut v: Value) -> Value {
    v.as_object_mut().unwrap().remove("projectedAt");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_read_model_is_rebuilt_from_the_event_history() {
    let app = TestApp::spawn_with(|c| {
        c.cook_time = Some(Duration::from_millis(20));
        c.delivery_time = Some(Duration::from_millis(20));
    })
    .await;
    let r = restaurant();
    app.set_menu(&r, "plenty", 100).await;
    app.set_menu(&r, "none", 0).await;
    let delivered = app.place_ok("yuna", &r, &[("plenty", 2)]).await;
    let rejected = app.place_ok("yuna", &r, &[("none", 1)]).await;
    app.wait_status(&delivered, "DELIVERED").await;
    app.wait_status(&rejected, "REJECTED").await;
    let mut before = Vec::new();
    for id in [&delivered, &rejected] {
        app.wait_mypage(id, |v| {
            matches!(v["orderStatus"].as_str(), Some("DELIVERED" | "REJECTED"))
                && v["deliveryStatus"] != "DELIVERING"
        })
        .await;
        // The last events (OrderDelivered, OrderRejected) add no status, only
        // time: wait until the view stops changing.
        let mut last = Value::Null;
        loop {
            let v = without_projection_time(app.get_ok(&format!("/mypages/{id}")).await);
            if v == last {
                break;
            }
            last = v;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        before.push(last);
    }

    // The read model is lost.
    let db = mypage_db(&app).await;
    db.execute(sqlx::query("DELETE FROM views")).await.unwrap();
    db.close().await;
    assert_eq!(
        app.get(&format!("/mypages/{delivered}")).await.status(),
        404
    );

    let res = app.post("/admin/mypage/rebuild").await;
    assert_eq!(res.status(), 200);
    let report: Value = res.json().await.unwrap();
    assert!(report["events"].as_u64().unwrap() >= 8, "{report}");
    assert!(report["views"].as_i64().unwrap() >= 2, "{report}");
    for (id, expected) in [&delivered, &rejected].into_iter().zip(before) {
        let v = app.get_ok(&format!("/mypages/{id}")).await;
        assert_eq!(without_projection_time(v), expected);
    }
    assert_eq!(
        app.get_ok("/mypages?customerId=yuna")
            .await
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // The live projection goes on into the rebuilt table.
    let later = app.place_ok("yuna", &r, &[("plenty", 1)]).await;
    app.wait_mypage(&later, |v| v["orderStatus"] == "DELIVERED")
        .await;
    app.stop().await;
}
