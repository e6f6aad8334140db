//! The browser files the gateway serves: the client library (`/client.js`, its types at
//! `/client.d.ts`, the JSON encoding at `/client-json.js`), the chat at `/`, the volume
//! viewer at `/volume` and the admin page at `/admin` (served only when enabled). Built from `gateway/web/` (`npm run build`) and committed, so the
//! binary embeds them and `cargo run` needs no npm; CI checks they are what the sources
//! build. Served with an ETag (a hash of the file, made once) and `Cache-Control:
//! no-cache`, so browsers revalidate with a cheap 304 after an upgrade.

use crate::http::{self as h, Body};
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};
use std::sync::LazyLock;

struct File {
    path: &'static str,
    content_type: &'static str,
    bytes: &'static [u8],
}

macro_rules! file {
    ($path:literal, $name:literal, $type:expr) => {
        File {
            path: $path,
            content_type: $type,
            bytes: include_bytes!(concat!("../web/dist/", $name)),
        }
    };
}

const JS: &str = "text/javascript; charset=utf-8";
const HTML: &str = "text/html; charset=utf-8";

static FILES: &[File] = &[
    file!("/", "index.html", HTML),
    file!("/volume", "volume.html", HTML),
    file!("/client.js", "client.js", JS),
    file!(
        "/client.d.ts",
        "client.d.ts",
        "application/typescript; charset=utf-8"
    ),
    file!("/client-json.js", "client-json.js", JS),
    file!("/chat.js", "chat.js", JS),
    file!("/volume.js", "volume.js", JS),
    file!("/admin", "admin.html", HTML),
    file!("/admin.js", "admin.js", JS),
];

/// An ETag per file: FNV-1a over its bytes, computed on first use.
static ETAGS: LazyLock<Vec<String>> = LazyLock::new(|| {
    FILES
        .iter()
        .map(|f| {
            let hash = f.bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
            format!("\"{hash:016x}\"")
        })
        .collect()
});

/// The file at `path`, if it is one of ours.
pub fn serve(method: &Method, path: &str, headers: &HeaderMap) -> Option<Response<Body>> {
    if method != Method::GET && method != Method::HEAD {
        return None;
    }
    let i = FILES.iter().position(|f| f.path == path)?;
    let (file, etag) = (&FILES[i], &ETAGS[i]);
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let mut response = if fresh {
        let mut r = Response::new(h::full(""));
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else if method == Method::HEAD {
        h::response(StatusCode::OK, file.content_type, "")
    } else {
        h::response(StatusCode::OK, file.content_type, file.bytes)
    };
    let hs = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(etag) {
        hs.insert(header::ETAG, v);
    }
    hs.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    hs.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if method == Method::HEAD {
        hs.insert(header::CONTENT_LENGTH, HeaderValue::from(file.bytes.len()));
    }
    Some(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_every_file_with_revalidation() {
        let none = HeaderMap::new();
        for f in FILES {
            let r = serve(&Method::GET, f.path, &none).expect(f.path);
            assert_eq!(r.status(), StatusCode::OK);
            assert!(!f.bytes.is_empty(), "{} is built", f.path);
            let etag = r.headers()[header::ETAG].clone();
            let mut again = HeaderMap::new();
            again.insert(header::IF_NONE_MATCH, etag);
            let r = serve(&Method::GET, f.path, &again).unwrap();
            assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
        }
        assert!(serve(&Method::GET, "/nope.js", &none).is_none());
        assert!(serve(&Method::POST, "/", &none).is_none());
    }
}
