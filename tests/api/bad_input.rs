//! Bad input gets a clear 4xx with a problem-details body: never a 5xx,
//! never a panic, never a changed state.

use serde_json::{Value, json};

use crate::helpers::*;

async fn expect_problem(res: reqwest::Response, status: u16) -> Value {
    let got = res.status().as_u16();
    let content_type = res.headers()["content-type"].to_str().unwrap().to_owned();
    let text = res.text().await.unwrap();
    assert_eq!(got, status, "{text}");
    assert_eq!(content_type, "application/problem+json", "{text}");
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["status"], status);
    assert!(body["title"].as_str().is_some_and(|t| !t.is_empty()));
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_or_invalid_orders_are_refused_with_problem_details() {
    let app = TestApp::spawn().await;
    let post_raw = |body: &'static str| {
        app.client
            .post(format!("{}/orders", app.url))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    expect_problem(post_raw("{not json").await.unwrap(), 400).await;
    expect_problem(post_raw("").await.unwrap(), 400).await;
    expect_problem(post_raw("[]").await.unwrap(), 422).await;
    expect_problem(post_raw(r#"{"customerId": 5}"#).await.unwrap(), 422).await;
    let too_big = r#"{"customerId":"c","restaurantId":"r","address":"a",
        "items":[{"menuId":"m","qty":99999999999999999999}]}"#;
    expect_problem(post_raw(too_big).await.unwrap(), 422).await;

    let order = |items: Value| json!({"customerId": "c", "restaurantId": "r", "items": items, "address": "a"});
    for (items, why) in [
        (json!([]), "items"),
        (json!([{"menuId": "m", "qty": 0}]), "qty"),
        (json!([{"menuId": "m", "qty": -2}]), "qty"),
        (json!([{"menuId": "m", "qty": 1000000}]), "qty"),
        (json!([{"menuId": "", "qty": 1}]), "menuId"),
        (json!([{"menuId": "m", "qty": "2"}]), "qty"),
        (json!([{"menuId": "m", "qty": 1.5}]), "qty"),
        (json!("m"), "items"),
    ] {
        let res = app
            .client
            .post(format!("{}/orders", app.url))
            .json(&order(items.clone()))
            .send()
            .await
            .unwrap();
        let p = expect_problem(res, 422).await;
        assert!(p["detail"].as_str().unwrap().contains(why), "{items}: {p}");
    }
    let blank = json!({"customerId": " ", "restaurantId": "r",
        "items": [{"menuId": "m", "qty": 1}], "address": "a"});
    let res = app
        .client
        .post(format!("{}/orders", app.url))
        .json(&blank)
        .send()
        .await
        .unwrap();
    expect_problem(res, 422).await;

    let res = app
        .client
        .post(format!("{}/orders", app.url))
        .body(r#"{"customerId":"c"}"#)
        .send()
        .await
        .unwrap();
    expect_problem(res, 415).await;

    let huge = format!(r#"{{"customerId":"{}"}}"#, "x".repeat(200_000));
    let res = app
        .client
        .post(format!("{}/orders", app.url))
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    expect_problem(res, 413).await;

    let res = app
        .client
        .post(format!("{}/orders", app.url))
        .header("Idempotency-Key", "")
        .json(&order(json!([{"menuId": "m", "qty": 1}])))
        .send()
        .await
        .unwrap();
    expect_problem(res, 400).await;

    // Nothing of the above created an order.
    assert_eq!(app.get_ok("/orders?customerId=c").await, json!([]));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_ids_routes_and_methods_are_clear_4xx() {
    let app = TestApp::spawn().await;
    for path in [
        "/orders/no-such-order",
        "/cooks/no-such-cook",
        "/deliveries/no-such-delivery",
        "/mypages/no-such-order",
        "/no-such-route",
    ] {
        expect_problem(app.get(path).await, 404).await;
    }
    expect_problem(app.cancel("no-such-order").await, 404).await;
    expect_problem(app.post("/cooks/nope/complete").await, 404).await;
    expect_problem(app.post("/deliveries/nope/complete").await, 404).await;
    for path in ["/orders", "/menus", "/cooks", "/deliveries", "/mypages"] {
        expect_problem(app.get(path).await, 400).await;
    }
    expect_problem(app.get("/orders?customerId=c&limit=0").await, 400).await;
    expect_problem(app.get("/orders?customerId=c&limit=abc").await, 400).await;
    let res = app
        .client
        .patch(format!("{}/orders/x", app.url))
        .send()
        .await
        .unwrap();
    expect_problem(res, 405).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_menu_items_are_refused() {
    let app = TestApp::spawn().await;
    let put = |body: Value| {
        app.client
            .put(format!("{}/menus/r1/m1", app.url))
            .json(&body)
            .send()
    };
    expect_problem(
        put(json!({"name": "x", "price": 1, "stock": -1}))
            .await
            .unwrap(),
        422,
    )
    .await;
    expect_problem(
        put(json!({"name": "", "price": 1, "stock": 1}))
            .await
            .unwrap(),
        422,
    )
    .await;
    expect_problem(
        put(json!({"name": "x", "price": -5, "stock": 1}))
            .await
            .unwrap(),
        422,
    )
    .await;
    expect_problem(put(json!({"name": "x", "price": 1})).await.unwrap(), 422).await;
    let res = put(json!({"name": "Bibimbap", "price": 12000, "stock": 3}))
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let res = put(json!({"name": "Bibimbap", "price": 12000, "stock": 4}))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(app.stock("r1", "m1").await, 4);
    app.stop().await;
}
