//! Cancelling: synchronously through the kitchen, refused when too late,
//! and deferred durably when the kitchen cannot answer in time.

use std::time::Duration;

use serde_json::Value;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_while_cooking_cancels_the_ticket_and_restores_stock() {
    let app = TestApp::spawn().await;
    let r = restaurant();
    app.set_menu(&r, "bibimbap", 5).await;
    let id = app.place_ok("alice", &r, &[("bibimbap", 3)]).await;
    let accepted = app.wait_status(&id, "ACCEPTED").await;
    assert_eq!(app.stock(&r, "bibimbap").await, 2);

    let res = app.cancel(&id).await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["status"], "CANCELLED");
    assert_eq!(app.stock(&r, "bibimbap").await, 5, "stock restored");
    let cook = app
        .get_ok(&format!("/cooks/{}", accepted["cookId"].as_str().unwrap()))
        .await;
    assert_eq!(cook["status"], "CANCELLED");

    // Again, in both of the API's forms: still 200, stock restored once.
    assert_eq!(app.cancel(&id).await.status(), 200);
    let res = app
        .client
        .delete(format!("{}/orders/{id}", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(app.stock(&r, "bibimbap").await, 5);

    let view = app
        .wait_mypage(&id, |v| {
            v["orderStatus"] == "CANCELLED" && v["cookStatus"] == "CANCELLED"
        })
        .await;
    assert_eq!(view["reason"], "cancelled by customer");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_before_the_kitchen_saw_the_order_reserves_nothing() {
    let app = TestApp::spawn().await;
    let r = restaurant();
    app.set_menu(&r, "bibimbap", 5).await;
    // Cancel immediately, racing the kitchen; either way the end state is
    // the same: cancelled, and all stock back.
    let id = app.place_ok("alice", &r, &[("bibimbap", 2)]).await;
    let res = app.cancel(&id).await;
    assert_eq!(res.status(), 200);
    app.wait_mypage(&id, |v| v["orderStatus"] == "CANCELLED")
        .await;
    app.wait_until(&format!("/cooks?orderId={id}"), |c| {
        c[0]["status"] == "CANCELLED"
    })
    .await;
    assert_eq!(app.stock(&r, "bibimbap").await, 5);
    assert_eq!(app.order(&id).await["status"], "CANCELLED");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_after_cooking_is_refused_with_409() {
    let app = TestApp::spawn().await;
    let r = restaurant();
    app.set_menu(&r, "bulgogi", 5).await;
    let id = app.place_ok("bob", &r, &[("bulgogi", 1)]).await;
    let accepted = app.wait_status(&id, "ACCEPTED").await;
    let cook_id = accepted["cookId"].as_str().unwrap();
    assert_eq!(
        app.post(&format!("/cooks/{cook_id}/complete"))
            .await
            .status(),
        200
    );

    let res = app.cancel(&id).await;
    assert_eq!(res.status(), 409);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    let problem: Value = res.json().await.unwrap();
    assert!(
        problem["detail"].as_str().unwrap().contains("too late")
            || problem["detail"].as_str().unwrap().contains("delivery"),
        "{problem}"
    );
    assert_eq!(app.stock(&r, "bulgogi").await, 4, "nothing restored");

    // The order goes on to delivery, and a cancel then is refused too.
    app.wait_status(&id, "DELIVERING").await;
    assert_eq!(app.cancel(&id).await.status(), 409);
    // Completing a cooked ticket again is harmless.
    assert_eq!(
        app.post(&format!("/cooks/{cook_id}/complete"))
            .await
            .status(),
        200
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_the_kitchen_cannot_answer_in_time_is_deferred_not_lost() {
    // A zero deadline: the synchronous call can never answer in time, so
    // every cancel takes the durable path (OrderCancelRequested → kitchen).
    let app = TestApp::spawn_with(|c| c.cancel_timeout = Duration::ZERO).await;
    let r = restaurant();
    app.set_menu(&r, "tteokbokki", 4).await;
    let id = app.place_ok("frank", &r, &[("tteokbokki", 3)]).await;
    app.wait_status(&id, "ACCEPTED").await;
    assert_eq!(app.stock(&r, "tteokbokki").await, 1);

    let res = app.cancel(&id).await;
    assert_eq!(res.status(), 202);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["status"], "CANCEL_PENDING");
    // Asking again while pending is 202 again, and queues nothing new.
    assert_eq!(app.cancel(&id).await.status(), 202);

    app.wait_status(&id, "CANCELLED").await;
    app.wait_mypage(&id, |v| v["orderStatus"] == "CANCELLED")
        .await;
    assert_eq!(
        app.stock(&r, "tteokbokki").await,
        4,
        "restored exactly once"
    );
    assert_eq!(app.cancel(&id).await.status(), 200);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_rejected_order_is_a_conflict() {
    let app = TestApp::spawn().await;
    let r = restaurant();
    app.set_menu(&r, "rare", 0).await;
    let id = app.place_ok("gina", &r, &[("rare", 1)]).await;
    app.wait_status(&id, "REJECTED").await;
    let res = app.cancel(&id).await;
    assert_eq!(res.status(), 409);
    let problem: Value = res.json().await.unwrap();
    assert_eq!(problem["status"], 409);
    assert_eq!(problem["title"], "Conflict");
    app.stop().await;
}
