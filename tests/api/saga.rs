//! The saga's flows, end to end through the gateway.

use serde_json::Value;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_is_cooked_delivered_and_visible_on_mypage_all_the_way() {
    let app = TestApp::spawn().await;
    let r = restaurant();
    app.set_menu(&r, "bibimbap", 10).await;

    let res = app.place("alice", &r, &[("bibimbap", 2)]).await;
    assert_eq!(res.status(), 201);
    let location = res.headers()["location"].to_str().unwrap().to_owned();
    let placed: Value = res.json().await.unwrap();
    let id = placed["id"].as_str().unwrap();
    assert_eq!(location, format!("/orders/{id}"));
    assert_eq!(placed["status"], "PLACED");

    let accepted = app.wait_status(id, "ACCEPTED").await;
    assert_eq!(app.stock(&r, "bibimbap").await, 8, "reserved on acceptance");
    let cook_id = accepted["cookId"].as_str().unwrap().to_owned();
    let cooks = app.get_ok(&format!("/cooks?orderId={id}")).await;
    assert_eq!(cooks[0]["id"], cook_id.as_str());
    assert_eq!(cooks[0]["status"], "COOKING");
    app.wait_mypage(id, |v| v["cookStatus"] == "COOKING").await;

    let res = app.post(&format!("/cooks/{cook_id}/complete")).await;
    assert_eq!(res.status(), 200);
    let delivering = app.wait_status(id, "DELIVERING").await;
    let delivery_id = delivering["deliveryId"].as_str().unwrap().to_owned();
    let d = app.get_ok(&format!("/deliveries/{delivery_id}")).await;
    assert_eq!(d["orderId"], id);
    assert_eq!(d["status"], "DELIVERING");
    let on_the_way = app
        .wait_mypage(id, |v| v["deliveryStatus"] == "DELIVERING")
        .await;
    assert_eq!(on_the_way["deliveredAt"], Value::Null, "{on_the_way}");

    let res = app
        .post(&format!("/deliveries/{delivery_id}/complete"))
        .await;
    assert_eq!(res.status(), 200);
    app.wait_status(id, "DELIVERED").await;

    let view = app
        .wait_mypage(id, |v| {
            v["orderStatus"] == "DELIVERED" && v["deliveryStatus"] == "DELIVERED"
        })
        .await;
    assert_eq!(view["customerId"], "alice");
    assert_eq!(view["cookStatus"], "COOKED");
    assert_eq!(view["cookId"], cook_id.as_str());
    assert_eq!(view["deliveryId"], delivery_id.as_str());
    assert_eq!(view["items"][0]["qty"], 2);
    // Delivered when the courier completed it: after the placement, and
    // no later than the last event the view reflects.
    let time = |v: &Value| {
        let t = v.as_str().unwrap_or_else(|| panic!("a timestamp, got {v}"));
        restaurant_platform::parse_rfc3339(t).unwrap_or_else(|| panic!("RFC 3339: {t}"))
    };
    let delivered_at = time(&view["deliveredAt"]);
    assert_eq!(view["placedAt"], placed["createdAt"], "{view}");
    assert!(
        time(&placed["createdAt"]) <= delivered_at,
        "{placed} {view}"
    );
    assert!(delivered_at <= time(&view["updatedAt"]), "{view}");
    let mine = app.get_ok("/mypages?customerId=alice").await;
    assert_eq!(mine.as_array().unwrap().len(), 1);
    let orders = app.get_ok("/orders?customerId=alice").await;
    assert_eq!(orders[0]["id"], id);
    assert_eq!(
        app.stock(&r, "bibimbap").await,
        8,
        "taken once, never again"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automatic_timers_carry_an_order_to_delivered() {
    let app = TestApp::spawn_with(|c| {
        c.cook_time = Some(std::time::Duration::from_millis(50));
        c.delivery_time = Some(std::time::Duration::from_millis(50));
    })
    .await;
    let r = restaurant();
    app.set_menu(&r, "bulgogi", 3).await;
    let id = app.place_ok("bob", &r, &[("bulgogi", 1)]).await;
    app.wait_status(&id, "DELIVERED").await;
    app.wait_mypage(&id, |v| v["orderStatus"] == "DELIVERED")
        .await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_stock_rejects_the_order_and_reserves_nothing() {
    let app = TestApp::spawn().await;
    let r = restaurant();
    app.set_menu(&r, "kimchi", 1).await;
    let id = app.place_ok("carol", &r, &[("kimchi", 2)]).await;
    let order = app.wait_status(&id, "REJECTED").await;
    assert!(
        order["reason"].as_str().unwrap().contains("kimchi"),
        "{order}"
    );
    assert_eq!(app.stock(&r, "kimchi").await, 1);
    let view = app
        .wait_mypage(&id, |v| v["orderStatus"] == "REJECTED")
        .await;
    assert_eq!(view["cookStatus"], "REJECTED");
    assert_eq!(view["deliveryStatus"], Value::Null);
    assert!(view["reason"].as_str().unwrap().contains("out of stock"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_short_line_rejects_the_whole_order_and_leaves_other_lines_untouched() {
    let app = TestApp::spawn().await;
    let r = restaurant();
    app.set_menu(&r, "rice", 5).await;
    app.set_menu(&r, "soup", 1).await;
    let id = app
        .place_ok("dave", &r, &[("rice", 2), ("soup", 3), ("rice", 1)])
        .await;
    let order = app.wait_status(&id, "REJECTED").await;
    assert!(order["reason"].as_str().unwrap().contains("soup"));
    assert_eq!(app.stock(&r, "rice").await, 5);
    assert_eq!(app.stock(&r, "soup").await, 1);

    // A menu item that does not exist is a shortage too.
    let id = app.place_ok("dave", &r, &[("rice", 1), ("pizza", 1)]).await;
    let order = app.wait_status(&id, "REJECTED").await;
    assert!(
        order["reason"]
            .as_str()
            .unwrap()
            .contains("pizza is not on the menu")
    );
    assert_eq!(app.stock(&r, "rice").await, 5);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_never_creates_a_second_order() {
    let app = TestApp::spawn().await;
    let r = restaurant();
    app.set_menu(&r, "mandu", 10).await;
    let body = serde_json::json!({
        "customerId": "erin", "restaurantId": r,
        "items": [{"menuId": "mandu", "qty": 1}], "address": "Busan"
    });
    let send = |key: &'static str, body: Value| {
        let req = app
            .client
            .post(format!("{}/orders", app.url))
            .header("Idempotency-Key", key)
            .json(&body);
        async move { req.send().await.unwrap() }
    };
    // Concurrent first attempts and a later retry: one order.
    let (a, b) = tokio::join!(send("key-1", body.clone()), send("key-1", body.clone()));
    let c = send("key-1", body.clone()).await;
    let mut ids = Vec::new();
    for res in [a, b, c] {
        assert_eq!(res.status(), 201);
        let v: Value = res.json().await.unwrap();
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    assert!(ids.iter().all(|i| *i == ids[0]), "{ids:?}");
    app.wait_status(&ids[0], "ACCEPTED").await;
    assert_eq!(app.stock(&r, "mandu").await, 9);
    let orders = app.get_ok("/orders?customerId=erin").await;
    assert_eq!(orders.as_array().unwrap().len(), 1);

    // The same key with a different request is refused, not answered with
    // the wrong order.
    let mut other = body.clone();
    other["items"][0]["qty"] = 3.into();
    let res = send("key-1", other).await;
    assert_eq!(res.status(), 422);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_orders_for_the_last_units_never_oversell() {
    const ORDERS: usize = 40;
    const UNITS: i64 = 7;
    let app = TestApp::spawn().await;
    let r = restaurant();
    app.set_menu(&r, "special", UNITS).await;
    let placed = futures_util::future::join_all((0..ORDERS).map(|i| {
        let app = &app;
        let r = r.clone();
        async move { app.place_ok(&format!("c{i}"), &r, &[("special", 1)]).await }
    }))
    .await;
    let mut accepted = 0;
    for id in &placed {
        let o = app
            .wait_until(&format!("/orders/{id}"), |o| o["status"] != "PLACED")
            .await;
        match o["status"].as_str().unwrap() {
            "ACCEPTED" => accepted += 1,
            "REJECTED" => {}
            s => panic!("unexpected {s}"),
        }
    }
    assert_eq!(accepted, UNITS);
    assert_eq!(app.stock(&r, "special").await, 0);
    app.stop().await;
}
