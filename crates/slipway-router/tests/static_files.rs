use std::path::Path;

use hyper::{Method, StatusCode};
use slipway_router::{CacheBudget, Route, StaticSite};
use tempfile::TempDir;

use crate::util::{raw_request, raw_status, Client, Req, TestRouter};

/// Over the largest file the memory cache keeps (2 MiB), so it is always streamed from disk.
const BIG_LEN: usize = 3 * 1024 * 1024;

/// A site tree next to a directory outside it (the target of escaping symlinks).
struct Site {
    _dir: TempDir,
    root: std::path::PathBuf,
    router: TestRouter,
    client: Client,
}

fn write(path: &Path, contents: impl AsRef<[u8]>) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, contents).unwrap();
}

fn big_contents() -> Vec<u8> {
    (0..BIG_LEN).map(|i| (i % 251) as u8).collect()
}

async fn site(spa_fallback: bool) -> Site {
    site_with(spa_fallback, None).await
}

/// `cache_limit`: the site's memory cache budget (`None`: the default).
async fn site_with(spa_fallback: bool, cache_limit: Option<u64>) -> Site {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("site");
    let outside = dir.path().join("outside");
    write(&root.join("index.html"), "<h1>home</h1>");
    write(&root.join("style.css"), "body{}");
    write(&root.join("app.js"), "console.log('plain')");
    write(&root.join("app.js.br"), "BROTLI");
    write(&root.join("app.js.gz"), "GZIP");
    write(&root.join("only-gz.css"), "p{}");
    write(&root.join("only-gz.css.gz"), "GZIP-CSS");
    write(&root.join("logo.png"), [0x89, b'P', b'N', b'G']);
    write(&root.join("data.json"), "{}");
    write(&root.join("blob.weirdext"), "?");
    write(&root.join("big.bin"), big_contents());
    write(&root.join("docs/index.html"), "<h1>docs</h1>");
    write(&root.join("docs/page.html"), "<h1>page</h1>");
    write(&root.join(".env"), "SECRET=1");
    write(&root.join(".git/config"), "[core]");
    write(&root.join(".well-known/security.txt"), "Contact: x");
    std::fs::create_dir_all(root.join("empty")).unwrap();
    write(&outside.join("secret.txt"), "outside secret");
    std::os::unix::fs::symlink(outside.join("secret.txt"), root.join("escape.txt")).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("escape-dir")).unwrap();
    std::os::unix::fs::symlink("../outside/secret.txt", root.join("up.txt")).unwrap();
    std::os::unix::fs::symlink("style.css", root.join("alias.css")).unwrap();
    std::os::unix::fs::symlink("../docs/page.html", root.join("empty/page-link.html")).unwrap();
    // Absolute targets name paths inside the build sandbox: refused even when they point inside.
    std::os::unix::fs::symlink(root.join("style.css"), root.join("absolute.css")).unwrap();

    let router = TestRouter::start_default().await;
    let mut static_site = StaticSite::new(&root)
        .unwrap()
        .with_spa_fallback(spa_fallback);
    if let Some(limit) = cache_limit {
        static_site = static_site.with_cache_limit(limit);
    }
    router.set("site.test", Route::Static(static_site));
    let client = Client::new(router.addr);
    Site {
        _dir: dir,
        root,
        router,
        client,
    }
}

impl Site {
    async fn get(&self, path: &str) -> crate::util::Reply {
        self.client.get("site.test", path).await
    }

    async fn send(&self, req: Req) -> crate::util::Reply {
        self.client.send(req).await
    }
}

fn get(path: &str) -> Req {
    Req::get("site.test", path)
}

#[tokio::test]
async fn serves_files_with_content_types() {
    let site = site(false).await;
    for (path, content_type, body) in [
        ("/index.html", "text/html; charset=utf-8", "<h1>home</h1>"),
        ("/style.css", "text/css; charset=utf-8", "body{}"),
        (
            "/app.js",
            "text/javascript; charset=utf-8",
            "console.log('plain')",
        ),
        ("/data.json", "application/json; charset=utf-8", "{}"),
        ("/blob.weirdext", "application/octet-stream", "?"),
    ] {
        let reply = site.get(path).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}");
        assert_eq!(reply.header("content-type"), Some(content_type), "{path}");
        assert_eq!(reply.text(), body, "{path}");
        assert_eq!(
            reply.header("content-length"),
            Some(body.len().to_string().as_str()),
            "{path}"
        );
    }
    let png = site.get("/logo.png").await;
    assert_eq!(png.header("content-type"), Some("image/png"));
    assert_eq!(&png.body[..], [0x89, b'P', b'N', b'G']);

    let big = site.get("/big.bin").await;
    assert_eq!(big.status, StatusCode::OK);
    assert_eq!(
        big.body.as_ref(),
        big_contents().as_slice(),
        "large files are streamed intact"
    );
}

#[tokio::test]
async fn cache_control_is_no_cache_for_html_only() {
    let site = site(false).await;
    assert_eq!(
        site.get("/").await.header("cache-control"),
        Some("no-cache")
    );
    assert_eq!(
        site.get("/docs/page.html").await.header("cache-control"),
        Some("no-cache")
    );
    assert_eq!(
        site.get("/style.css").await.header("cache-control"),
        Some("public, max-age=300")
    );
}

#[tokio::test]
async fn etag_and_if_none_match_give_304() {
    let site = site(false).await;
    let first = site.get("/style.css").await;
    let etag = first.header("etag").expect("etag").to_owned();
    assert!(
        etag.starts_with('"') && etag.ends_with('"'),
        "strong etag: {etag}"
    );
    assert_eq!(
        site.get("/style.css").await.header("etag"),
        Some(etag.as_str()),
        "stable across requests"
    );
    assert_ne!(
        site.get("/app.js").await.header("etag"),
        Some(etag.as_str()),
        "differs between files"
    );

    let cached = site
        .send(get("/style.css").header("if-none-match", &etag))
        .await;
    assert_eq!(cached.status, StatusCode::NOT_MODIFIED);
    assert!(cached.body.is_empty());
    assert_eq!(cached.header("etag"), Some(etag.as_str()));

    let listed = site
        .send(get("/style.css").header("if-none-match", &format!("\"nope\", W/{etag}")))
        .await;
    assert_eq!(listed.status, StatusCode::NOT_MODIFIED);

    let stale = site
        .send(get("/style.css").header("if-none-match", "\"other\""))
        .await;
    assert_eq!(stale.status, StatusCode::OK);
    assert_eq!(stale.text(), "body{}");
}

/// Without the memory cache (a tree that may change), a rewritten file gets a new tag.
#[tokio::test]
async fn rewritten_file_gets_a_new_etag_when_uncached() {
    let site = site_with(false, Some(0)).await;
    let etag = site
        .get("/style.css")
        .await
        .header("etag")
        .expect("etag")
        .to_owned();
    write(&site.root.join("style.css"), "body{color:red}");
    let changed = site
        .send(get("/style.css").header("if-none-match", &etag))
        .await;
    assert_eq!(changed.status, StatusCode::OK);
    assert_eq!(changed.text(), "body{color:red}");
}

/// The requests of these tests, answered by a cached and an uncached site: same status, body
/// and headers (bar `Date`).
#[tokio::test]
async fn cached_and_uncached_answers_are_identical() {
    let cached = site(true).await;
    let uncached = site_with(true, Some(0)).await;
    let etag = cached
        .get("/app.js")
        .await
        .header("etag")
        .unwrap()
        .to_owned();
    let requests = || {
        vec![
            get("/index.html"),
            get("/"),
            get("/docs/"),
            get("/docs"),
            get("/style.css").header("range", "bytes=1-3"),
            get("/style.css").header("range", "bytes=-2"),
            get("/style.css").header("range", "bytes=10-"),
            get("/style.css").header("range", "bytes=0-1,3-4"),
            get("/app.js").header("accept-encoding", "br, gzip"),
            get("/app.js").header("accept-encoding", "gzip"),
            get("/app.js").header("accept-encoding", "identity"),
            get("/only-gz.css").header("accept-encoding", "br, gzip"),
            get("/app.js").header("if-none-match", "\"x\""),
            get("/style.css").header("if-modified-since", "Mon, 01 Jan 2001 00:00:00 GMT"),
            get("/style.css").header("if-modified-since", "Mon, 01 Jan 2091 00:00:00 GMT"),
            get("/logo.png"),
            get("/big.bin").header("range", "bytes=0-99"),
            get("/client/route").header("accept", "text/html"),
            get("/client/route"),
            get("/missing.txt"),
            Req::new(Method::HEAD, "site.test", "/data.json"),
        ]
    };
    // Twice: the first round fills the cache, the second is answered from it.
    for round in 0..2 {
        for (a, b) in requests().into_iter().zip(requests()) {
            let (a, b) = (cached.send(a).await, uncached.send(b).await);
            let mut a_headers = a.headers.clone();
            let mut b_headers = b.headers.clone();
            for headers in [&mut a_headers, &mut b_headers] {
                headers.remove("date");
                // Tags name the file's identity: the same files in two trees differ.
                headers.remove("etag");
                headers.remove("last-modified");
            }
            assert_eq!(a.status, b.status, "round {round}: {a:?} vs {b:?}");
            assert_eq!(a.body, b.body, "round {round}");
            assert_eq!(a_headers, b_headers, "round {round}");
        }
    }
    let not_modified = cached
        .send(get("/app.js").header("if-none-match", &etag))
        .await;
    assert_eq!(not_modified.status, StatusCode::NOT_MODIFIED);
    assert!(not_modified.header("content-length").is_none());
    assert!(not_modified.header("content-type").is_none());
}

/// Small files are answered from memory after their first request (so a file removed from the
/// immutable tree is still served); large ones, and answers that depend on `Accept`, are not.
#[tokio::test]
async fn small_files_are_served_from_memory_after_the_first_request() {
    let site = site(true).await;
    let first = site
        .send(get("/app.js").header("accept-encoding", "br"))
        .await;
    assert_eq!(first.text(), "BROTLI");
    assert_eq!(site.get("/docs/").await.text(), "<h1>docs</h1>");
    assert_eq!(site.get("/big.bin").await.body.len(), BIG_LEN);
    let spa = site
        .send(get("/client/route").header("accept", "text/html"))
        .await;
    assert_eq!(spa.text(), "<h1>home</h1>");

    for name in [
        "app.js",
        "app.js.br",
        "app.js.gz",
        "docs/index.html",
        "big.bin",
    ] {
        std::fs::remove_file(site.root.join(name)).unwrap();
    }
    // Every form of a cached file was read with it, whatever the first request accepted.
    let br = site
        .send(get("/app.js").header("accept-encoding", "br"))
        .await;
    assert_eq!(br.text(), "BROTLI");
    assert_eq!(br.header("etag"), first.header("etag"));
    let gzip = site
        .send(get("/app.js").header("accept-encoding", "gzip"))
        .await;
    assert_eq!(gzip.text(), "GZIP");
    assert_eq!(gzip.header("content-encoding"), Some("gzip"));
    let plain = site
        .send(get("/app.js").header("range", "bytes=8-10"))
        .await;
    assert_eq!(plain.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(plain.text(), "log");
    assert_eq!(site.get("/docs/").await.text(), "<h1>docs</h1>");
    assert_eq!(
        site.get("/big.bin").await.status,
        StatusCode::NOT_FOUND,
        "not cached: too big"
    );
    // The fallback answer was not cached under its path: without `Accept: text/html`, 404.
    assert_eq!(
        site.get("/client/route").await.status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn the_cache_stays_within_its_budget() {
    const LIMIT: u64 = 4000;
    let site = site_with(false, Some(LIMIT)).await;
    let names: Vec<String> = (0..8).map(|i| format!("file{i}.txt")).collect();
    for name in &names {
        write(&site.root.join(name), vec![b'x'; 1000]);
    }
    for name in &names {
        assert_eq!(site.get(&format!("/{name}")).await.body.len(), 1000);
    }
    let Some(Route::Static(static_site)) = site.router.router.get("site.test") else {
        panic!("static route");
    };
    let held = static_site.cached_bytes();
    assert!(
        held > 0 && held <= LIMIT,
        "cache holds {held} bytes, limit {LIMIT}"
    );
    for name in &names {
        std::fs::remove_file(site.root.join(name)).unwrap();
    }
    let mut still_served = 0;
    for name in &names {
        let reply = site.get(&format!("/{name}")).await;
        if reply.status == StatusCode::OK {
            still_served += 1;
        }
    }
    assert!(
        (1..names.len()).contains(&still_served),
        "{still_served} of {} files served from memory",
        names.len()
    );
}

/// Many static deployments share one memory bound: two sites on one budget hold no more than
/// it together, and a site's bytes go back to the budget when its route is replaced.
#[tokio::test]
async fn sites_share_one_cache_budget_and_return_it_when_dropped() {
    const BUDGET: u64 = 5000;
    let budget = CacheBudget::new(BUDGET);
    let router = TestRouter::start_default().await;
    let client = Client::new(router.addr);
    let dirs: Vec<TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    for (i, dir) in dirs.iter().enumerate() {
        for f in 0..4 {
            write(
                &dir.path().join(format!("f{f}.txt")),
                vec![b'a' + i as u8; 1000],
            );
        }
        let site = StaticSite::new(dir.path())
            .unwrap()
            .with_cache_budget(budget.clone());
        router.set(&format!("s{i}.test"), Route::Static(site));
    }
    for i in 0..2 {
        for f in 0..4 {
            let reply = client
                .send(Req::new(
                    Method::GET,
                    &format!("s{i}.test"),
                    &format!("/f{f}.txt"),
                ))
                .await;
            assert_eq!(reply.body.len(), 1000);
        }
    }
    let used = budget.used();
    assert!(
        used > 0 && used <= BUDGET,
        "two sites hold {used} bytes on a {BUDGET}-byte budget"
    );
    // Both sites got some of it: the first did not starve the second completely, nor could
    // it take more than the budget.
    let held: Vec<u64> = (0..2)
        .map(|i| match router.router.get(&format!("s{i}.test")) {
            Some(Route::Static(site)) => site.cached_bytes(),
            _ => panic!("static route"),
        })
        .collect();
    assert_eq!(held.iter().sum::<u64>(), used);
    // Replacing the first site's route drops its cache: its bytes are free again.
    router.router.remove("s0.test");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while budget.used() != held[1] && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        budget.used(),
        held[1],
        "the removed site's cache was not returned"
    );
}

#[tokio::test]
async fn last_modified_and_if_modified_since_give_304() {
    let site = site(false).await;
    let first = site.get("/style.css").await;
    let last_modified = first
        .header("last-modified")
        .expect("last-modified")
        .to_owned();
    let cached = site
        .send(get("/style.css").header("if-modified-since", &last_modified))
        .await;
    assert_eq!(cached.status, StatusCode::NOT_MODIFIED);
    let old = site
        .send(get("/style.css").header("if-modified-since", "Mon, 01 Jan 2001 00:00:00 GMT"))
        .await;
    assert_eq!(old.status, StatusCode::OK);
    // If-None-Match wins over If-Modified-Since.
    let both = site
        .send(
            get("/style.css")
                .header("if-modified-since", &last_modified)
                .header("if-none-match", "\"other\""),
        )
        .await;
    assert_eq!(both.status, StatusCode::OK);
}

#[tokio::test]
async fn single_ranges_are_206_and_unsatisfiable_ones_416() {
    let site = site(false).await;
    let big = big_contents();

    let head = site
        .send(get("/big.bin").header("range", "bytes=0-9"))
        .await;
    assert_eq!(head.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        head.header("content-range"),
        Some(format!("bytes 0-9/{BIG_LEN}").as_str())
    );
    assert_eq!(head.body.as_ref(), &big[0..10]);

    let middle = site
        .send(get("/big.bin").header("range", "bytes=1000-299999"))
        .await;
    assert_eq!(middle.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(middle.body.as_ref(), &big[1000..300000], "streamed range");

    let suffix = site.send(get("/big.bin").header("range", "bytes=-5")).await;
    assert_eq!(suffix.body.as_ref(), &big[BIG_LEN - 5..]);

    let beyond = site
        .send(get("/big.bin").header("range", &format!("bytes={BIG_LEN}-")))
        .await;
    assert_eq!(beyond.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(
        beyond.header("content-range"),
        Some(format!("bytes */{BIG_LEN}").as_str())
    );
    assert_eq!(beyond.error_code(), Some("range_not_satisfiable"));

    let multi = site
        .send(get("/style.css").header("range", "bytes=0-1,3-4"))
        .await;
    assert_eq!(multi.status, StatusCode::OK);
    assert_eq!(multi.text(), "body{}");

    let etag = site
        .get("/style.css")
        .await
        .header("etag")
        .unwrap()
        .to_owned();
    let matching = site
        .send(
            get("/style.css")
                .header("range", "bytes=0-3")
                .header("if-range", &etag),
        )
        .await;
    assert_eq!(matching.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(matching.text(), "body");
    let outdated = site
        .send(
            get("/style.css")
                .header("range", "bytes=0-3")
                .header("if-range", "\"old\""),
        )
        .await;
    assert_eq!(outdated.status, StatusCode::OK);
    assert_eq!(outdated.text(), "body{}");
}

#[tokio::test]
async fn precompressed_siblings_only_when_accepted() {
    let site = site(false).await;
    let br = site
        .send(get("/app.js").header("accept-encoding", "gzip, deflate, br"))
        .await;
    assert_eq!(br.text(), "BROTLI");
    assert_eq!(br.header("content-encoding"), Some("br"));
    assert_eq!(
        br.header("content-type"),
        Some("text/javascript; charset=utf-8")
    );
    assert_eq!(br.header("vary"), Some("accept-encoding"));

    let gzip = site
        .send(get("/app.js").header("accept-encoding", "gzip"))
        .await;
    assert_eq!(gzip.text(), "GZIP");
    assert_eq!(gzip.header("content-encoding"), Some("gzip"));

    let refused = site
        .send(get("/app.js").header("accept-encoding", "br;q=0, gzip;q=0"))
        .await;
    assert_eq!(refused.text(), "console.log('plain')");
    assert_eq!(refused.header("content-encoding"), None);

    let plain = site.get("/app.js").await;
    assert_eq!(plain.text(), "console.log('plain')");
    assert_eq!(plain.header("content-encoding"), None);
    assert_eq!(plain.header("vary"), Some("accept-encoding"));

    let only_gz = site
        .send(get("/only-gz.css").header("accept-encoding", "br, gzip"))
        .await;
    assert_eq!(only_gz.text(), "GZIP-CSS");
    assert_eq!(only_gz.header("content-encoding"), Some("gzip"));

    assert_ne!(
        br.header("etag"),
        plain.header("etag"),
        "each representation has its own tag"
    );
}

#[tokio::test]
async fn directories_serve_index_html_after_a_slash_redirect() {
    let site = site(false).await;
    let root = site.get("/").await;
    assert_eq!(root.status, StatusCode::OK);
    assert_eq!(root.text(), "<h1>home</h1>");

    let redirect = site.get("/docs?x=1").await;
    assert_eq!(redirect.status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(redirect.header("location"), Some("/docs/?x=1"));
    assert_eq!(site.get("/docs/").await.text(), "<h1>docs</h1>");

    // A leading `//` must not become an off-site Location.
    let doubled = site.get("//docs").await;
    assert_eq!(doubled.header("location"), Some("/docs/"));

    let empty = site.get("/empty/").await;
    assert_eq!(empty.status, StatusCode::NOT_FOUND, "no directory listing");
    assert_eq!(empty.error_code(), Some("not_found"));
    assert_eq!(site.get("/style.css/").await.status, StatusCode::NOT_FOUND);
    assert_eq!(
        site.get("/missing.html").await.status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn spa_fallback_serves_index_for_html_navigation_only() {
    let on = site(true).await;
    let navigation = on
        .send(get("/dashboard/settings").header("accept", "text/html,application/xhtml+xml"))
        .await;
    assert_eq!(navigation.status, StatusCode::OK);
    assert_eq!(navigation.text(), "<h1>home</h1>");
    assert_eq!(navigation.header("cache-control"), Some("no-cache"));

    let asset = on
        .send(get("/missing.js").header("accept", "text/html"))
        .await;
    assert_eq!(
        asset.status,
        StatusCode::NOT_FOUND,
        "paths with an extension are real misses"
    );
    let api = on
        .send(get("/api/users").header("accept", "application/json"))
        .await;
    assert_eq!(api.status, StatusCode::NOT_FOUND);
    assert_eq!(api.header("content-type"), Some("application/json"));

    let off = site(false).await;
    let missing = off
        .send(get("/dashboard/settings").header("accept", "text/html"))
        .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.error_code(), Some("not_found"));
}

#[tokio::test]
async fn traversal_is_refused() {
    let site = site(false).await;
    for path in [
        "/../outside/secret.txt",
        "/docs/../../outside/secret.txt",
        "/%2e%2e/outside/secret.txt",
        "/docs/%2E%2E/%2e%2E/outside/secret.txt",
        "/..%2foutside%2fsecret.txt",
        "/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    ] {
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: site.test\r\nConnection: close\r\n\r\n");
        let response = raw_request(site.router.addr, &request).await;
        assert_eq!(raw_status(&response), 400, "{path}: {response}");
        assert!(!response.contains("outside secret"), "{path}");
    }
}

#[tokio::test]
async fn symlinks_out_of_the_root_and_dotfiles_are_not_served() {
    let site = site(false).await;
    for path in [
        "/escape.txt",
        "/escape-dir/secret.txt",
        "/up.txt",
        "/absolute.css",
        "/.env",
        "/.git/config",
        "/%2eenv",
    ] {
        let reply = site.get(path).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{path}");
        assert!(
            !reply.text().contains("secret") && !reply.text().contains("SECRET"),
            "{path}"
        );
        assert!(
            !reply.text().contains(site.root.to_str().unwrap()),
            "{path} leaks the root"
        );
    }
    let alias = site.get("/alias.css").await;
    assert_eq!(
        alias.status,
        StatusCode::OK,
        "symlinks inside the root are fine"
    );
    assert_eq!(alias.text(), "body{}");
    let sideways = site.get("/empty/page-link.html").await;
    assert_eq!(
        sideways.status,
        StatusCode::OK,
        "relative links within the root resolve"
    );
    assert_eq!(sideways.text(), "<h1>page</h1>");
    assert_eq!(
        site.get("/.well-known/security.txt").await.text(),
        "Contact: x"
    );
}

#[tokio::test]
async fn head_has_headers_without_body_and_other_methods_are_405() {
    let site = site(false).await;
    let head = site
        .send(Req::new(Method::HEAD, "site.test", "/big.bin"))
        .await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(
        head.header("content-length"),
        Some(BIG_LEN.to_string().as_str())
    );
    assert!(head.header("etag").is_some());
    assert!(head.body.is_empty());

    let post = site
        .send(Req::new(Method::POST, "site.test", "/index.html").body("x"))
        .await;
    assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(post.header("allow"), Some("GET, HEAD"));
}
