//! The policy model, its file format and its errors.

use bytes::Bytes;
use http::Request;

use super::*;
use crate::extract::RoutePattern;
use crate::{Claim, ExtractClaims, Rejection, Unique, Window};

const SHOP: &str = include_str!("../../examples/gateway/shop.toml");

/// The complete example in the module docs, as a file.
fn documented_example() -> String {
    let docs: String = include_str!("mod.rs")
        .lines()
        .filter_map(|l| l.strip_prefix("//!"))
        .map(|l| l.strip_prefix(' ').unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    let start = docs.find("```toml\n").expect("a toml block") + "```toml\n".len();
    let end = start + docs[start..].find("```").expect("its end");
    docs[start..end].to_owned()
}

#[test]
fn the_documented_example_is_a_valid_policy() {
    let policy = Policy::from_toml(&documented_example()).unwrap();
    assert_eq!(policy.routes().len(), 4);
    assert!(policy.routes()[3].is_shadow());
    assert_eq!(policy.table_named("plans").unwrap()["pro"], 100_000);
}

#[test]
fn the_shop_policy_says_the_shops_two_rules() {
    let policy = Policy::from_toml(SHOP).unwrap();
    let products = policy.table_named("products").unwrap();
    for n in 1..=100u64 {
        assert_eq!(products[&n.to_string()], n * 100, "product {n}");
    }
    let built = Policy::new()
        .table("products", (1..=100u64).map(|n| (n.to_string(), n * 100)))
        .route(
            Route::new(http::Method::POST, "/customers/{customer_id}/purchases").budget(
                BudgetRule::new(
                    "customer:{path.customer_id}".parse().unwrap(),
                    Number::sum("/product_ids", "products"),
                    Number::Fixed(50_000),
                ),
            ),
        )
        .route(
            Route::new(http::Method::POST, "/accounts").unique(
                UniqueRule::own(
                    "accounts",
                    "{body./email}".parse().unwrap(),
                    "{header.x-account-id}".parse().unwrap(),
                )
                .normalize(Normalize::Email),
            ),
        );
    assert_eq!(
        policy.routes(),
        built.routes(),
        "the file and the builder agree"
    );
}

/// `(file, line, field, part of the message)` for files that must be refused.
const BAD: &[(&str, usize, &str, &str)] = &[
    (
        "[[route]]\nmethod = \"POST\"\npath = \"/a\"\nshadow = \"yes\"\n",
        4,
        "route[0].shadow",
        "boolean",
    ),
    (
        "[[route]]\nmethod = \"post\"\npath = \"/a\"\n",
        2,
        "route[0].method",
        "capitals",
    ),
    (
        "[[route]]\nmethod = \"POST\"\npath = \"/a\"\nleese = \"1s\"\n",
        4,
        "route[0].leese",
        "unknown field",
    ),
    (
        "[[route]]\nmethod = \"POST\"\npath = \"/a\"\nlease = \"1 minute\"\n",
        4,
        "route[0].lease",
        "not a duration",
    ),
    (
        "[[route]]\nmethod = \"POST\"\npath = \"/a\"\n\n[[route.budget]]\nkey = \"{cookie.id}\"\namount = 1\nlimit = 1\n",
        6,
        "route[0].budget[0].key",
        "unknown source",
    ),
    (
        "[[route]]\nmethod = \"POST\"\npath = \"/a/{id}\"\n\n[[route.budget]]\nkey = \"k:{path.customer}\"\namount = 1\nlimit = 1\n",
        6,
        "route[0].budget[0].key",
        "no parameter {customer}",
    ),
    (
        "[[route]]\nmethod = \"POST\"\npath = \"/a\"\n\n[[route.budget]]\nkey = \"k\"\namount = 0\nlimit = 1\n",
        7,
        "route[0].budget[0].amount",
        "not within 1 to",
    ),
    (
        "[[route]]\nmethod = \"POST\"\npath = \"/a\"\n\n[[route.budget]]\nkey = \"k\"\namount = 1\nlimit = 9007199254740992\n",
        8,
        "route[0].budget[0].limit",
        "9007199254740992 is not within 0 to 9007199254740991",
    ),
    (
        "[[route]]\nmethod = \"POST\"\npath = \"/a\"\n\n[[route.budget]]\nkey = \"k\"\namount = -5\nlimit = 1\n",
        7,
        "route[0].budget[0].amount",
        "negative",
    ),
    (
        "[[route]]\nmethod = \"POST\"\npath = \"/a\"\n\n[[route.budget]]\nkey = \"k\"\namount = { sum = \"/ids\", table = \"prices\" }\nlimit = 1\n",
        7,
        "route[0].budget[0].amount",
        "no table \"prices\"",
    ),
    (
        "[[route]]\nmethod = \"POST\"\npath = \"/a\"\n\n[[route.budget]]\nkey = \"k\"\namount = 1\nlimit = 1\nwindow = \"fortnight\"\n",
        9,
        "route[0].budget[0].window",
        "not a window",
    ),
    (
        "[[route]]\nmethod = \"POST\"\npath = \"/a\"\n\n[[route.budget]]\nkey = \"k\"\namount = 1\n",
        5,
        "route[0].budget[0]",
        "missing field `limit`",
    ),
    (
        "[[route]]\nmethod = \"POST\"\npath = \"/a\"\n",
        1,
        "route[0]",
        "reserves something",
    ),
    (
        "[[route]]\nmethod = \"POST\"\npath = \"/a\"\n[[route.unique]]\nnamespace = \"a{b}\"\nvalue = \"{body./v}\"\nowner = \"o\"\n",
        5,
        "route[0].unique[0].namespace",
        "braces",
    ),
    (
        "[[route]]\nmethod = \"POST\"\npath = \"/a\"\n[[route.unique]]\nnamespace = \"n\"\nvalue = \"{body./v}\"\nowner = \"o\"\nnormalize = \"lower\"\n",
        8,
        "route[0].unique[0].normalize",
        "unknown variant",
    ),
    (
        "[[route]]\nmethod = \"POST\"\npath = \"/a\"\ncommit = [\"2xx\", 700]\n[[route.unique]]\nnamespace = \"n\"\nvalue = \"v\"\nowner = \"o\"\n",
        4,
        "route[0].commit[1]",
        "700 is not a status",
    ),
    (
        "[[route]]\nmethod = \"POST\"\npath = \"/a\"\n[[route.unique]]\nnamespace = \"n\"\nvalue = \"v\"\nowner = \"{header.o}\"\n\n[[route]]\nmethod = \"POST\"\npath = \"/a\"\n[[route.unique]]\nnamespace = \"n\"\nvalue = \"v\"\nowner = \"{header.o}\"\n",
        11,
        "route[1].path",
        "declared twice",
    ),
    (
        "[tables.products]\n1 = 100\n2 = 9007199254740992\n",
        3,
        "tables.products.2",
        "above the largest amount",
    ),
    (
        "[[route]]\nmethod = \"POST\"\npath = \"/a\"\n[[route.unique]]\nnamespace = \"n\"\nvalue = \"v\"\nowner = \"o\"\nlease = \"0s\"\n",
        8,
        "route[0].unique[0].lease",
        "unknown field",
    ),
    (
        "[[route]]\nmethod = \"POST\"\npath = \"/a\"\nlease = \"2d\"\n[[route.unique]]\nnamespace = \"n\"\nvalue = \"v\"\nowner = \"o\"\n",
        4,
        "route[0].lease",
        "1 ms to 1 day",
    ),
    (
        "[[route]]\nmethod = \"POST\"\npath = \"/a\"\n[[route.unique]]\nnamespace = \"n\"\nvalue = \"{body./username}\"\nowner = \"{body./username}\"\n",
        7,
        "route[0].unique[0].owner",
        "read from nothing but what the value is read from",
    ),
    (
        "[[route]]\nmethod = \"POST\"\npath = \"/a/{id}\"\n[[route.unique]]\nnamespace = \"n\"\nvalue = \"{path.id}:{body./v}\"\nowner = \"user-{path.id}\"\n",
        7,
        "route[0].unique[0].owner",
        "give the route a mint_id",
    ),
    (
        "[[route]]\nmethod = \"POST\"\npath = \"/a\"\nmint_id = \"x account\"\n[[route.unique]]\nnamespace = \"n\"\nvalue = \"v\"\nowner = \"{header.o}\"\n",
        4,
        "route[0].mint_id",
        "not a header name",
    ),
    (
        "[[route]]\nmethod = \"POST\"\npath = \"a/{id}\"\n[[route.unique]]\nnamespace = \"n\"\nvalue = \"v\"\nowner = \"o\"\n",
        3,
        "route[0].path",
        "starts with '/'",
    ),
];

#[test]
fn bad_files_are_refused_at_their_line_and_field() {
    for (text, line, field, message) in BAD {
        let err = Policy::from_toml(text).expect_err(text);
        assert_eq!(err.line(), Some(*line), "{text}\n{err}");
        assert_eq!(err.field(), Some(*field), "{text}\n{err}");
        assert!(err.message().contains(message), "{text}\n{err}");
        let shown = err.to_string();
        assert!(
            shown.starts_with(&format!("line {line}, column ")) && shown.contains(field),
            "{shown}"
        );
    }
}

#[test]
fn syntax_errors_name_their_line() {
    let err = Policy::from_toml("[[route]]\nmethod = \"POST\npath = \"/a\"\n").unwrap_err();
    assert_eq!(err.line(), Some(2), "{err}");
    let err = Policy::load("/nonexistent/policy.toml").unwrap_err();
    assert!(err.message().contains("cannot read"), "{err}");
}

fn purchase(customer: &str, body: &'static str, content_type: &str) -> Request<Bytes> {
    let mut req = Request::post(format!("/customers/{customer}/purchases"))
        .header("content-type", content_type)
        .body(Bytes::from_static(body.as_bytes()))
        .unwrap();
    req.extensions_mut()
        .insert(RoutePattern("/customers/{customer_id}/purchases".into()));
    req
}

async fn claims_of(claims: &RouteClaims, req: Request<Bytes>) -> Result<Vec<Claim>, Rejection> {
    claims.extract(req).await.map(|(_, claims)| claims)
}

fn route_claims(policy: &Policy, i: usize) -> RouteClaims {
    policy.route_claims().unwrap().swap_remove(i).2
}

#[tokio::test]
async fn a_purchase_spends_the_sum_of_its_prices() {
    let policy = Policy::from_toml(SHOP).unwrap();
    let claims = route_claims(&policy, 0);
    let json = "application/json";
    let got = claims_of(
        &claims,
        purchase("ann", r#"{"product_ids": [20, "3", 20]}"#, json),
    )
    .await
    .unwrap();
    assert_eq!(
        got,
        [Claim::spend(
            crate::Budget::new("customer:ann", 50_000),
            4_300
        )]
    );
    let status = |r: Result<Vec<Claim>, Rejection>| r.unwrap_err().status().as_u16();
    let unknown = claims_of(&claims, purchase("ann", r#"{"product_ids": [101]}"#, json)).await;
    let unknown = unknown.unwrap_err();
    assert_eq!(unknown.status(), 422);
    assert_eq!(unknown.extra()["id"], 101);
    assert_eq!(unknown.extra()["table"], "products");
    let cases = [
        (r#"{"product_ids": [1"#, json, 400),
        ("product_ids=1", "text/plain", 415),
        (r#"{"product_ids": 1}"#, json, 422),
        (r#"{"product_ids": [true]}"#, json, 422),
        (r#"{"products": [1]}"#, json, 422),
    ];
    for (body, content_type, want) in cases {
        let got = claims_of(&claims, purchase("ann", body, content_type)).await;
        assert_eq!(status(got), want, "{body}");
    }
}

#[tokio::test]
async fn sums_above_the_largest_amount_are_refused() {
    let policy = Policy::new()
        .table("t", [("big", crate::MAX_AMOUNT), ("one", 1)])
        .route(
            Route::new(http::Method::POST, "/customers/{customer_id}/purchases").budget(
                BudgetRule::new(
                    "k".parse().unwrap(),
                    Number::sum("/ids", "t"),
                    Number::Fixed(crate::MAX_AMOUNT),
                ),
            ),
        );
    let claims = route_claims(&policy, 0);
    let json = "application/json";
    let fits = claims_of(&claims, purchase("a", r#"{"ids": ["big"]}"#, json)).await;
    assert!(fits.is_ok());
    let over = claims_of(&claims, purchase("a", r#"{"ids": ["big", "one"]}"#, json)).await;
    assert_eq!(over.unwrap_err().status(), 422);
    let many = r#"{"ids": ["big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big","big"]}"#;
    let overflow = claims_of(&claims, purchase("a", many, json)).await;
    assert_eq!(overflow.unwrap_err().status(), 422);
}

#[tokio::test]
async fn limits_are_fixed_read_or_looked_up() {
    let policy = Policy::from_toml(&documented_example()).unwrap();
    let jobs = route_claims(&policy, 3);
    let req = |plan: &str, limit: &str| {
        Request::post("/v1/jobs?tenant=t1")
            .header("x-api-key", "key-9")
            .header("x-job-cost", "25")
            .header("x-plan", plan)
            .header("x-org-call-limit", limit)
            .header("content-type", "application/json")
            .body(Bytes::from_static(br#"{"org": {"id": 77}}"#))
            .unwrap()
    };
    let got = claims_of(&jobs, req("pro", "600")).await.unwrap();
    assert_eq!(
        got,
        [
            Claim::spend(
                crate::Budget::new("tenant:t1:key-9", 100_000).per(Window::Day),
                25
            ),
            Claim::spend(
                crate::Budget::new("org:77", 600)
                    .per(Window::Every(std::time::Duration::from_secs(60))),
                1
            ),
        ]
    );
    let unknown_plan = claims_of(&jobs, req("gold", "600")).await.unwrap();
    assert!(matches!(&unknown_plan[0], Claim::Spend { budget, .. } if budget.limit() == 1000));
    let bad_limit = claims_of(&jobs, req("pro", "lots")).await;
    assert_eq!(bad_limit.unwrap_err().status(), 400);
}

#[tokio::test]
async fn a_routes_budgets_are_the_ones_its_claims_spend_from() {
    let policy = Policy::from_toml(&documented_example()).unwrap();
    let budgets = policy.budgets_of(&http::Method::POST, "/v1/jobs").unwrap();
    assert_eq!(budgets.len(), 2);
    let req = || {
        Request::post("/v1/jobs?tenant=t1")
            .header("x-api-key", "key-9")
            .header("x-job-cost", "25")
            .header("x-plan", "pro")
            .header("x-org-call-limit", "600")
            .header("content-type", "application/json")
            .body(Bytes::from_static(br#"{"org": {"id": 77}}"#))
            .unwrap()
    };
    let claims = claims_of(&route_claims(&policy, 3), req()).await.unwrap();
    for (budget_of, claim) in budgets.iter().zip(&claims) {
        let Claim::Spend { budget, .. } = claim else {
            panic!("a budget claim: {claim:?}");
        };
        let of = budget_of.budget(&req()).unwrap();
        assert_eq!(&of, budget);
        assert_eq!(of.limit(), budget.limit());
    }
    // A usage request: its head only. The first budget reads the head; the second its body.
    let head = Request::get("/usage?tenant=t1")
        .header("x-api-key", "key-9")
        .header("x-plan", "free")
        .body(Bytes::new())
        .unwrap();
    assert_eq!(
        budgets[0].budget(&head).unwrap(),
        crate::Budget::new("tenant:t1:key-9", 1000).per(Window::Day)
    );
    assert_eq!(budgets[1].budget(&head).unwrap_err().status(), 415);
    // A route the policy does not have, or a policy that does not validate.
    let err = policy
        .budgets_of(&http::Method::GET, "/v1/jobs")
        .unwrap_err();
    assert!(err.message().contains("no route GET /v1/jobs"), "{err}");
    // It says which routes the policy has.
    assert!(
        err.message()
            .ends_with("; its routes are POST /customers/{customer_id}/purchases, POST /accounts, PUT /accounts/{account_id}/email, POST /v1/jobs"),
        "{err}"
    );
    assert!(
        Policy::new()
            .route(Route::new(http::Method::POST, "nope"))
            .budgets_of(&http::Method::POST, "nope")
            .is_err()
    );
}

#[tokio::test]
async fn unique_values_are_normalized_and_owned_or_released() {
    let policy = Policy::from_toml(&documented_example()).unwrap();
    let change = route_claims(&policy, 2);
    let mut req = Request::put("/accounts/acc-1/email")
        .header("content-type", "application/json")
        .header("x-current-email", "old@example.com")
        .body(Bytes::from_static(br#"{"email": " New@Example.COM"}"#))
        .unwrap();
    req.extensions_mut()
        .insert(RoutePattern("/accounts/{account_id}/email".into()));
    let got = claims_of(&change, req).await.unwrap();
    assert_eq!(
        got,
        [
            Claim::own(Unique::email("accounts", "new@example.com"), "acc-1"),
            Claim::release_on_commit(Unique::email("accounts", "old@example.com"), "acc-1"),
        ]
    );
}

#[tokio::test]
async fn a_digest_key_keys_every_unique_value_of_the_policy() {
    let key = crate::DigestKey::new("a deployment secret").unwrap();
    let policy = Policy::from_toml(&documented_example())
        .unwrap()
        .digest_key(key.clone());
    let change = route_claims(&policy, 2);
    let mut req = Request::put("/accounts/acc-1/email")
        .header("content-type", "application/json")
        .header("x-current-email", "old@example.com")
        .body(Bytes::from_static(br#"{"email": " New@Example.COM"}"#))
        .unwrap();
    req.extensions_mut()
        .insert(RoutePattern("/accounts/{account_id}/email".into()));
    let got = claims_of(&change, req).await.unwrap();
    assert_eq!(
        got,
        [
            Claim::own(
                Unique::keyed_email("accounts", "new@example.com", &key),
                "acc-1"
            ),
            Claim::release_on_commit(
                Unique::keyed_email("accounts", "old@example.com", &key),
                "acc-1"
            ),
        ]
    );
    assert_ne!(
        Unique::keyed_email("accounts", "new@example.com", &key),
        Unique::email("accounts", "new@example.com")
    );
}

mod layer {
    use std::convert::Infallible;

    use bytes::Bytes;
    use http::{Request, Response, StatusCode};
    use http_body_util::{BodyExt, Full};
    use tower::{Layer, ServiceExt, service_fn};

    use super::super::*;
    use super::SHOP;
    use crate::extract::RoutePattern;
    use crate::{Hold, MemoryStore};

    /// Answers what it saw: whether the body was read, the route pattern, whether a hold came
    /// with the request, and the body's length.
    async fn echo(req: Request<PolicyBody>) -> Result<Response<Full<Bytes>>, Infallible> {
        let read = req.body().was_read();
        let pattern = req
            .extensions()
            .get::<RoutePattern>()
            .map_or("-".to_owned(), |p| p.0.to_string());
        let held = req.extensions().get::<Hold>().is_some();
        let len = req.into_body().collect().await.unwrap().to_bytes().len();
        let text = format!("{read} {pattern} {held} {len}");
        Ok(Response::new(Full::new(Bytes::from(text))))
    }

    fn post(path: &str, body: impl Into<Bytes>) -> Request<Full<Bytes>> {
        Request::post(path)
            .header("content-type", "application/json")
            .body(Full::new(body.into()))
            .unwrap()
    }

    #[tokio::test]
    async fn matched_routes_are_reserved_and_the_rest_passes_unread() {
        let policy = Policy::from_toml(SHOP).unwrap();
        let layer = PolicyLayer::new(MemoryStore::new(), &policy).unwrap();
        let service = layer.layer(service_fn(echo));
        let call = |req| async {
            let r = service.clone().oneshot(req).await.unwrap();
            let status = r.status();
            let body = r.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8(body.to_vec()).unwrap())
        };
        let buy = r#"{"product_ids": [100, 100, 100, 100, 100]}"#;
        let (status, seen) = call(post("/customers/c-1/purchases", buy)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            seen,
            format!(
                "true /customers/{{customer_id}}/purchases true {}",
                buy.len()
            )
        );
        let (status, _) = call(post("/customers/c-1/purchases", r#"{"product_ids": [1]}"#)).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        // A taken address is named as the client sent it.
        let sign_up = |account: &'static str| {
            let mut req = post("/accounts", r#"{"email": "Ann@Example.com"}"#);
            req.headers_mut()
                .insert("x-account-id", account.parse().unwrap());
            req
        };
        assert_eq!(call(sign_up("a-1")).await.0, StatusCode::OK);
        let (status, problem) = call(sign_up("a-2")).await;
        assert_eq!(status, StatusCode::CONFLICT);
        let problem: serde_json::Value = serde_json::from_str(&problem).unwrap();
        assert_eq!(problem["detail"], "the value at /email is already taken");
        // Not a route: a body far above any limit goes through, unread.
        let big = vec![b'x'; 1 << 20];
        let (status, seen) = call(post("/customers/c-1/refunds", big)).await;
        assert_eq!(
            (status, seen.as_str()),
            (StatusCode::OK, "false - false 1048576")
        );

        // Another policy: the purchase route is gone, the sign-up route stays.
        let without = Policy::from_toml(&SHOP.replace(
            "path = \"/customers/{customer_id}/purchases\"",
            "path = \"/customers/{customer_id}/orders\"",
        ))
        .unwrap();
        layer.reload(&without).unwrap();
        let (status, seen) =
            call(post("/customers/c-1/purchases", r#"{"product_ids": [1]}"#)).await;
        assert_eq!(
            (status, seen.as_str()),
            (StatusCode::OK, "false - false 20")
        );
        assert_eq!(
            layer.policy().routes()[0].path(),
            "/customers/{customer_id}/orders"
        );
        // A policy that does not validate leaves the one in force.
        let broken = Policy::new().route(Route::new(http::Method::POST, "/x"));
        assert!(layer.reload(&broken).is_err());
        assert_eq!(layer.policy().routes().len(), 2);
    }

    #[tokio::test]
    async fn a_route_can_answer_429_over_its_windowed_budget() {
        let policy = Policy::from_toml(
            r#"
            [[route]]
            method = "POST"
            path = "/keys/{key}/calls"
            too_many_requests = true
            remaining_headers = true
            [[route.budget]]
            key = "calls:{path.key}"
            amount = 1
            limit = 2
            window = "1h"
            "#,
        )
        .unwrap();
        let layer = PolicyLayer::new(MemoryStore::new(), &policy).unwrap();
        let service = layer.layer(service_fn(echo));
        let call = |req| async { service.clone().oneshot(req).await.unwrap() };
        for _ in 0..2 {
            assert_eq!(call(post("/keys/k-1/calls", "")).await.status(), 200);
        }
        let refused = call(post("/keys/k-1/calls", "")).await;
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
        let retry: u64 = refused.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=3600).contains(&retry), "{retry}");
        let state = refused.headers()["ratelimit"].to_str().unwrap();
        assert!(
            state.starts_with(&format!("\"/keys/{{key}}/calls\";r=0;t={retry};pk=")),
            "{state}"
        );
    }

    #[tokio::test]
    async fn a_sign_up_without_an_id_gets_one_minted_as_its_owner() {
        let policy = Policy::from_toml(
            r#"
            [[route]]
            method = "POST"
            path = "/accounts"
            mint_id = "x-account-id"
            [[route.unique]]
            namespace = "accounts"
            value = "{body./email}"
            normalize = "email"
            owner = "{header.x-account-id}"
            "#,
        )
        .unwrap();
        let layer = PolicyLayer::new(MemoryStore::new(), &policy).unwrap();
        // The inner service answers the id it got in the header and as an extension.
        let service = layer.layer(service_fn(|req: Request<PolicyBody>| async move {
            // One value: the client's were replaced.
            assert_eq!(req.headers().get_all("x-account-id").iter().count(), 1);
            let header = req.headers()["x-account-id"].to_str().unwrap().to_owned();
            let MintedId(minted) = req.extensions().get::<MintedId>().cloned().unwrap();
            assert_eq!(header, minted);
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(minted))))
        }));
        let sign_up = |email: &str, sent_id: Option<&str>| {
            let mut req = post("/accounts", format!(r#"{{"email": "{email}"}}"#));
            if let Some(id) = sent_id {
                req.headers_mut()
                    .append("x-account-id", id.parse().unwrap());
                req.headers_mut()
                    .append("x-account-id", id.parse().unwrap());
            }
            let service = service.clone();
            async move {
                let r = service.oneshot(req).await.unwrap();
                let status = r.status();
                let body = r.into_body().collect().await.unwrap().to_bytes();
                (status, String::from_utf8(body.to_vec()).unwrap())
            }
        };
        let (status, first) = sign_up("ann@example.com", None).await;
        assert_eq!(status, StatusCode::OK);
        // A UUID, version 4.
        assert_eq!(first.len(), 36, "{first}");
        assert_eq!(&first[14..15], "4", "{first}");
        // Each sign-up is an owner of its own: the same address again is taken, whatever id the
        // client sends (it is replaced, never used).
        let (status, _) = sign_up(" Ann@Example.com", Some(&first)).await;
        assert_eq!(status, StatusCode::CONFLICT);
        let (status, second) = sign_up("bob@example.com", Some("chosen-by-client")).await;
        assert_eq!(status, StatusCode::OK);
        assert_ne!(second, "chosen-by-client");
        assert_ne!(second, first);
    }

    /// A policy of one route, `method path`, spending 1 of a budget of 1 per `{path.PARAM}`
    /// (or per route, when the pattern has no parameter).
    fn one_call_each(method: &str, path: &str) -> Policy {
        let key = match crate::layer::extract::pattern_params(path).unwrap().first() {
            Some(param) => format!("calls:{{path.{param}}}"),
            None => "calls".to_owned(),
        };
        Policy::from_toml(&format!(
            "[[route]]\nmethod = \"{method}\"\npath = \"{path}\"\n[[route.budget]]\nkey = \"{key}\"\namount = 1\nlimit = 1\n"
        ))
        .unwrap()
    }

    #[tokio::test]
    async fn a_policy_is_checked_against_its_router() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};

        let ran = Arc::new(AtomicUsize::new(0));
        let handler = {
            let ran = ran.clone();
            move || {
                ran.fetch_add(1, Ordering::SeqCst);
                async { "ran" }
            }
        };
        let api: axum::Router =
            axum::Router::new().route("/keys/{key}/calls", axum::routing::post(handler.clone()));
        let app: axum::Router = axum::Router::new()
            .route("/users", axum::routing::post(handler.clone()))
            .route("/users/me", axum::routing::post(handler.clone()))
            .route("/users/{id}/avatar", axum::routing::put(handler.clone()))
            .route("/files/{*path}", axum::routing::any(handler.clone()))
            .nest("/api", api);
        // Served: by its pattern (parameters named otherwise), under a wildcard, nested.
        for (method, path) in [
            ("POST", "/users"),
            ("PUT", "/users/{user_id}/avatar"),
            ("POST", "/files/reports/{name}"),
            ("POST", "/api/keys/{k}/calls"),
            // Another method than the route's: the router answers 405, nothing runs.
            ("GET", "/users"),
        ] {
            let policy = one_call_each(method, path);
            policy
                .check_router(&app)
                .await
                .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        }
        // Not served: no route, or a route of another pattern takes it.
        for (method, path, says) in [
            ("POST", "/user", "no route of the router takes POST /user"),
            (
                "POST",
                "/users/{id}",
                "no route of the router takes POST /users/{id}",
            ),
            (
                "PUT",
                "/users/me/avatar",
                "with its route /users/{id}/avatar",
            ),
            ("POST", "/keys/{key}/calls", "no route of the router takes"),
        ] {
            let err = one_call_each(method, path)
                .check_router(&app)
                .await
                .expect_err(path);
            assert_eq!(err.field(), Some("route[0].path"), "{err}");
            assert!(err.message().contains(says), "{path}: {err}");
        }
        let empty = axum::Router::new();
        assert!(
            one_call_each("POST", "/users")
                .check_router(&empty)
                .await
                .is_err()
        );
        assert_eq!(ran.load(Ordering::SeqCst), 0, "a check runs no handler");
    }

    #[tokio::test]
    async fn on_a_router_a_request_takes_the_policy_route_of_the_routers_choice() {
        let post = |path: &str| Request::post(path).body(axum::body::Body::empty()).unwrap();
        let status = |app: &axum::Router, path: &str| {
            let (app, req) = (app.clone(), post(path));
            async move { app.oneshot(req).await.unwrap().status() }
        };
        // The router sends /users/me to its static route: the policy's /users/{id} is not it.
        let policy = one_call_each("POST", "/users/{id}");
        let app: axum::Router = axum::Router::new()
            .route("/users/me", axum::routing::post(|| async { "me" }))
            .route("/users/{user}", axum::routing::post(|| async { "user" }))
            .layer(PolicyLayer::new(MemoryStore::new(), &policy).unwrap());
        for _ in 0..3 {
            assert_eq!(status(&app, "/users/me").await, StatusCode::OK);
        }
        assert_eq!(status(&app, "/users/ann").await, StatusCode::OK);
        assert_eq!(status(&app, "/users/ann").await, StatusCode::FORBIDDEN);
        assert_eq!(status(&app, "/users/bob").await, StatusCode::OK);

        // Inside a nested router, the layer sees paths without the prefix, and so does the
        // policy: its pattern and its path parameters are the nested router's.
        let policy = one_call_each("POST", "/keys/{key}/calls");
        let api: axum::Router = axum::Router::new()
            .route(
                "/keys/{key}/calls",
                axum::routing::post(|| async { "called" }),
            )
            .layer(PolicyLayer::new(MemoryStore::new(), &policy).unwrap());
        let app: axum::Router = axum::Router::new().nest("/api", api);
        assert_eq!(status(&app, "/api/keys/a/calls").await, StatusCode::OK);
        assert_eq!(
            status(&app, "/api/keys/a/calls").await,
            StatusCode::FORBIDDEN
        );
        assert_eq!(status(&app, "/api/keys/b/calls").await, StatusCode::OK);
    }
}
