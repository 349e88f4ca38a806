//! Fault isolation: a kitchen that is down does not lose a cancel, and
//! orders placed while the kitchen or the couriers are down wait for them.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_kitchen_down_a_cancel_is_accepted_and_completed_when_it_is_back() {
    let mut app = TestApp::spawn_with(|c| c.cancel_timeout = Duration::from_millis(500)).await;
    let r = restaurant();
    app.set_menu(&r, "bibimbap", 5).await;
    let id = app.place_ok("alice", &r, &[("bibimbap", 2)]).await;
    app.wait_status(&id, "ACCEPTED").await;
    assert_eq!(app.stock(&r, "bibimbap").await, 3);

    app.system_mut().stop_service("cook").await.unwrap();
    let started = Instant::now();
    let res = app.cancel(&id).await;
    let took = started.elapsed();
    assert_eq!(res.status(), 202);
    assert!(
        took < Duration::from_millis(600),
        "answered within the timeout: {took:?}"
    );
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["status"], "CANCEL_PENDING");
    app.wait_mypage(&id, |v| v["orderStatus"] == "CANCEL_PENDING")
        .await;

    app.system_mut().start_service("cook").await.unwrap();
    app.wait_status(&id, "CANCELLED").await;
    let view = app
        .wait_mypage(&id, |v| {
            v["orderStatus"] == "CANCELLED" && v["cookStatus"] == "CANCELLED"
        })
        .await;
    assert_eq!(view["reason"], "cancelled by customer");
    assert_eq!(app.stock(&r, "bibimbap").await, 5, "restored exactly once");
    assert_eq!(app.cancel(&id).await.status(), 200);
    assert_eq!(app.stock(&r, "bibimbap").await, 5);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_placed_while_kitchen_and_delivery_are_down_wait_and_then_complete() {
    let mut app = TestApp::spawn_with(|c| {
        c.cook_time = Some(Duration::from_millis(20));
        c.delivery_time = Some(Duration::from_millis(20));
    })
    .await;
    let r = restaurant();
    app.set_menu(&r, "bulgogi", 10).await;
    app.system_mut().stop_service("cook").await.unwrap();
    app.system_mut().stop_service("delivery").await.unwrap();

    // The gateway says what is missing.
    let ready = app.get("/readyz").await;
    assert_eq!(ready.status(), 503);
    let problem: Value = ready.json().await.unwrap();
    assert_eq!(problem["notReady"], serde_json::json!(["cook", "delivery"]));

    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(app.place_ok(&format!("c{i}"), &r, &[("bulgogi", 1)]).await);
    }
    // Waiting, not failed.
    for id in &ids {
        let view = app.wait_mypage(id, |v| v["orderStatus"] == "PLACED").await;
        assert_eq!(view["cookStatus"], Value::Null);
        assert_eq!(view["reason"], Value::Null);
    }

    app.system_mut().start_service("cook").await.unwrap();
    for id in &ids {
        // MyPage and the order service read the kitchen's events each at its
        // own pace, so the order's ACCEPTED may trail the view's COOKED.
        app.wait_status(id, "ACCEPTED").await;
        let view = app.wait_mypage(id, |v| v["cookStatus"] == "COOKED").await;
        assert_eq!(view["deliveryStatus"], Value::Null, "no courier yet");
    }
    // Cooked, yet still waiting for a courier.
    for id in &ids {
        assert_eq!(app.order(id).await["status"], "ACCEPTED");
    }
    app.system_mut().start_service("delivery").await.unwrap();
    for id in &ids {
        app.wait_status(id, "DELIVERED").await;
    }
    assert_eq!(app.stock(&r, "bulgogi").await, 5);
    assert_eq!(app.get("/readyz").await.status(), 200);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferred_cancel_the_kitchen_refuses_lets_the_order_go_on_and_says_why() {
    let mut app = TestApp::spawn_with(|c| c.cancel_timeout = Duration::from_millis(300)).await;
    let r = restaurant();
    app.set_menu(&r, "japchae", 5).await;
    app.system_mut().stop_service("delivery").await.unwrap();
    let id = app.place_ok("hana", &r, &[("japchae", 1)]).await;
    let accepted = app.wait_status(&id, "ACCEPTED").await;
    let cook_id = accepted["cookId"].as_str().unwrap();
    assert_eq!(
        app.post(&format!("/cooks/{cook_id}/complete"))
            .await
            .status(),
        200
    );

    // The kitchen is away when the customer cancels: deferred.
    app.system_mut().stop_service("cook").await.unwrap();
    assert_eq!(app.cancel(&id).await.status(), 202);
    app.system_mut().start_service("cook").await.unwrap();

    // Back, the kitchen finds the dish cooked and refuses; the order resumes.
    let order = app
        .wait_until(&format!("/orders/{id}"), |o| {
            o["status"] == "ACCEPTED" && !o["reason"].is_null()
        })
        .await;
    assert_eq!(order["reason"], "cancel refused: already cooked");
    let view = app
        .wait_mypage(&id, |v| {
            v["orderStatus"] == "ACCEPTED" && !v["reason"].is_null()
        })
        .await;
    assert_eq!(view["reason"], "cancel refused: already cooked");
    assert_eq!(view["cookStatus"], "COOKED");
    assert_eq!(app.stock(&r, "japchae").await, 4, "nothing restored");

    app.system_mut().start_service("delivery").await.unwrap();
    let delivering = app.wait_status(&id, "DELIVERING").await;
    let delivery_id = delivering["deliveryId"].as_str().unwrap();
    app.post(&format!("/deliveries/{delivery_id}/complete"))
        .await;
    app.wait_status(&id, "DELIVERED").await;
    let view = app
        .wait_mypage(&id, |v| v["orderStatus"] == "DELIVERED")
        .await;
    assert_eq!(view["reason"], "cancel refused: already cooked");
    app.stop().await;
}
