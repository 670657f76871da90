//! The event bus with a real deploy: a stalled subscriber neither delays the pipeline nor
//! blocks the others, and learns it fell behind through a resync.

use std::time::Duration;

use slipway_core::DeploymentStatus;
use slipway_engine::events::Delivery;
use slipway_engine::Event;
use slipway_store::Store;

use crate::util::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_subscriber_does_not_delay_a_deploy_and_gets_resync() {
    let Some(h) = harness().await else { return };
    h.write(&[("index.html", "<h1>events</h1>")]);
    h.set_spec(
        "",
        "i=0; while [ $i -lt 3000 ]; do echo line $i; i=$((i+1)); done",
        "exec python3 -m http.server $PORT --bind 127.0.0.1 2>/dev/null",
        3000,
    );
    // Never read until the deploy is over: room for 4 events, a deploy publishes dozens.
    let mut stalled = h.engine.events().subscribe_with_capacity(4);
    let mut live = h.engine.events().subscribe();
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        while let Some(d) = live.recv().await {
            let done = matches!(&d, Delivery::Event(e) if matches!(&**e, Event::RunUpdate(r) if r.status.is_settled()));
            got.push(d);
            if done {
                break;
            }
        }
        got
    });
    let run = h.start().await;
    // The deploy completes although one subscriber never reads.
    h.wait_for(&run.id, DeploymentStatus::Ready, Duration::from_secs(60))
        .await;

    // The reader that kept up saw the whole sequence in order, each log line once.
    let got = tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .expect("live subscriber finished")
        .unwrap();
    assert!(
        got.iter().all(|d| matches!(d, Delivery::Event(_))),
        "a reading subscriber never needs a resync"
    );
    let mut statuses = Vec::new();
    let mut next_line = 1;
    for d in &got {
        let Delivery::Event(e) = d else {
            unreachable!()
        };
        match &**e {
            Event::RunNew(r) => assert_eq!(r.id, run.id),
            Event::RunUpdate(r) => statuses.push(r.status),
            Event::LogAppend {
                first_line, lines, ..
            } => {
                assert_eq!(*first_line, next_line, "log batches are contiguous");
                next_line += lines.len() as u64;
            }
            _ => {}
        }
    }
    use DeploymentStatus::*;
    assert_eq!(
        statuses,
        [Capturing, Provisioning, Building, Starting, Ready]
    );
    assert_eq!(
        next_line - 1,
        h.store.log_count(&run.id).unwrap(),
        "every persisted line was published"
    );

    // The stalled one: a resync first (its queue overflowed), then at most 4 events.
    let first = stalled.try_recv().expect("something was delivered");
    let Delivery::Resync { missed } = first else {
        panic!("wanted a resync, got {first:?}")
    };
    assert!(missed > 0);
    let mut rest = 0;
    while let Some(d) = stalled.try_recv() {
        assert!(matches!(d, Delivery::Event(_)));
        rest += 1;
    }
    assert!(rest <= 4, "the stalled queue is bounded: {rest}");
    h.engine.stop(&h.agent, &run.id).await.unwrap();
}
