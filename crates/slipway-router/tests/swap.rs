use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use slipway_router::{Route, Upstream};

use crate::util::{eventually, Client, Loopback, TestRouter, TestUpstream, DEADLINE};

const SWAPS: usize = 200;
const WORKERS: usize = 6;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapping_routes_under_load_fails_no_request() {
    let router = TestRouter::start_default().await;
    let blue = TestUpstream::named("blue").await;
    let green = TestUpstream::named("green").await;
    let blue_route: Arc<dyn Upstream> = Arc::new(Loopback(blue.addr));
    let green_route: Arc<dyn Upstream> = Arc::new(Loopback(green.addr));
    router.set("swap.test", Route::Upstream(Arc::clone(&blue_route)));

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let client = Client::new(router.addr);
        let (stop, done) = (Arc::clone(&stop), Arc::clone(&done));
        workers.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            while !stop.load(Ordering::Acquire) {
                match client
                    .try_send(crate::util::Req::get("swap.test", "/"))
                    .await
                {
                    Ok(reply)
                        if reply.status == 200
                            && (reply.body == "blue" || reply.body == "green") => {}
                    Ok(reply) => failures.push(format!(
                        "{} {:?} {}",
                        reply.status,
                        reply.error_code(),
                        reply.text()
                    )),
                    Err(err) => failures.push(err.to_string()),
                }
                done.fetch_add(1, Ordering::AcqRel);
            }
            failures
        }));
    }

    for swap in 0..SWAPS {
        let next = if swap % 2 == 0 {
            &green_route
        } else {
            &blue_route
        };
        let before = done.load(Ordering::Acquire);
        router
            .router
            .set("swap.test", Route::Upstream(Arc::clone(next)))
            .unwrap();
        // Let requests land on each version of the table before the next swap.
        eventually("requests progress between swaps", || {
            done.load(Ordering::Acquire) > before + WORKERS
        })
        .await;
    }
    stop.store(true, Ordering::Release);

    let mut failures = Vec::new();
    for worker in workers {
        failures.extend(
            tokio::time::timeout(DEADLINE, worker)
                .await
                .expect("worker stops")
                .unwrap(),
        );
    }
    let total = done.load(Ordering::Acquire);
    assert!(
        failures.is_empty(),
        "{} of {total} requests failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(blue.requests.load(Ordering::SeqCst) > 0 && green.requests.load(Ordering::SeqCst) > 0);
    assert!(total > SWAPS * WORKERS);
}
