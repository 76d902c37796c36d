//! The dashboard at `GET /`: one page and its script, style and icon, embedded in the binary.
//! The script draws the page from our own JSON endpoints (`/stats`, `/usage`, `/admin/keys`,
//! `/alerts`), under their access rule; the page may load nothing from anywhere else.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, header};

/// The paths of the dashboard's files, under `/dashboard` (a reserved prefix).
pub const SCRIPT: &str = "/dashboard/app.js";
/// The style sheet.
pub const STYLE: &str = "/dashboard/style.css";
/// The icon, so that the browser does not ask for `/favicon.ico`.
pub const ICON: &str = "/dashboard/icon.svg";

const PAGE_HTML: &str = include_str!("dashboard/index.html");
const SCRIPT_JS: &str = include_str!("dashboard/app.js");
const STYLE_CSS: &str = include_str!("dashboard/style.css");
const ICON_SVG: &str = include_str!("dashboard/icon.svg");

/// Only our own origin: scripts and styles are the files above (no inline code), data comes
/// from our own endpoints, and the page can be neither framed nor made to post anywhere.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// `GET /`: the page.
pub async fn page() -> Response {
    file("text/html; charset=utf-8", PAGE_HTML)
}

/// `GET /dashboard/app.js`.
pub async fn script() -> Response {
    file("text/javascript; charset=utf-8", SCRIPT_JS)
}

/// `GET /dashboard/style.css`.
pub async fn style() -> Response {
    file("text/css; charset=utf-8", STYLE_CSS)
}

/// `GET /dashboard/icon.svg`.
pub async fn icon() -> Response {
    file("image/svg+xml", ICON_SVG)
}

/// One embedded file with the headers every dashboard answer carries. `no-store`: the page is
/// behind the admin token, and a shared cache must not keep it.
fn file(content_type: &'static str, body: &'static str) -> Response {
    let headers = [
        (header::CONTENT_TYPE, content_type),
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::CACHE_CONTROL, "no-store"),
    ];
    let mut response = body.into_response();
    for (name, value) in headers {
        response
            .headers_mut()
            .insert(name, HeaderValue::from_static(value));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_files_name_no_other_origin() {
        for text in [PAGE_HTML, SCRIPT_JS, STYLE_CSS, ICON_SVG] {
            let text = text.replace("http://www.w3.org/2000/svg", "");
            assert!(!text.contains("http://"), "{text}");
            assert!(!text.contains("https://"), "{text}");
            assert!(!text.contains("//cdn"), "{text}");
        }
    }

    #[test]
    fn the_page_loads_its_script_and_style_from_their_paths() {
        assert!(PAGE_HTML.contains(&format!("src=\"{SCRIPT}\"")));
        assert!(PAGE_HTML.contains(&format!("href=\"{STYLE}\"")));
        assert!(PAGE_HTML.contains(&format!("href=\"{ICON}\"")));
        assert!(!PAGE_HTML.contains("<script>"), "no inline script");
        assert!(!PAGE_HTML.contains("<style"), "no inline style");
        assert!(!PAGE_HTML.contains("style=\""), "no inline style");
    }
}
