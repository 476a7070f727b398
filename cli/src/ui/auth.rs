//! The dashboard's door: the URL token traded for a session cookie, 401 for
//! a request with neither, and the form token of control POSTs.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::Ui;

pub const COOKIE: &str = "hotswap_ui";

/// Equal in time that does not depend on where the texts differ, so the
/// token cannot be guessed a byte at a time from response times.
pub fn same_secret(given: &str, expected: &str) -> bool {
    let (given, expected) = (given.as_bytes(), expected.as_bytes());
    if given.len() != expected.len() {
        return false;
    }
    given
        .iter()
        .zip(expected)
        .fold(0u8, |diff, (a, b)| diff | (a ^ b))
        == 0
}

/// The `token=` value of a raw query string, and the query without it.
fn split_token(query: &str) -> (Option<&str>, String) {
    let mut token = None;
    let mut rest = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.strip_prefix("token=") {
            Some(value) => token = Some(value),
            None => rest.push(pair),
        }
    }
    (token, rest.join("&"))
}

/// The session cookie's value, if the request has one.
fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| pair.trim().strip_prefix(COOKIE)?.strip_prefix('='))
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "401: open the dashboard with the URL that `hotswapctl ui` printed (it carries the token)\n",
    )
        .into_response()
}

/// Let a request through with a valid session cookie; trade a valid URL
/// token for the cookie with a 303 to the same address without the token;
/// anything else is 401.
pub async fn require_session(State(ui): State<Arc<Ui>>, request: Request, next: Next) -> Response {
    let query = request.uri().query().unwrap_or_default();
    let (token, rest) = split_token(query);
    if let Some(token) = token {
        if !same_secret(token, &ui.login_token) {
            return unauthorized();
        }
        let path = request.uri().path();
        let location = if rest.is_empty() {
            path.to_string()
        } else {
            format!("{path}?{rest}")
        };
        let cookie = format!("{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/", ui.session);
        let mut response = StatusCode::SEE_OTHER.into_response();
        let headers = response.headers_mut();
        if let (Ok(location), Ok(cookie)) = (
            HeaderValue::from_str(&location),
            HeaderValue::from_str(&cookie),
        ) {
            headers.insert(header::LOCATION, location);
            headers.insert(header::SET_COOKIE, cookie);
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            return response;
        }
        return unauthorized();
    }
    match session_cookie(request.headers()) {
        Some(value) if same_secret(value, &ui.session) => next.run(request).await,
        _ => unauthorized(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abd", "abc"));
        assert!(!same_secret("ab", "abc"));
        assert!(!same_secret("", "abc"));
    }

    #[test]
    fn the_token_leaves_the_query_and_the_rest_stays() {
        assert_eq!(split_token("token=t1"), (Some("t1"), String::new()));
        assert_eq!(
            split_token("a=1&token=t2&b=2"),
            (Some("t2"), "a=1&b=2".to_string())
        );
        assert_eq!(split_token("a=1"), (None, "a=1".to_string()));
        assert_eq!(split_token(""), (None, String::new()));
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("other=1; hotswap_ui=s3cret; x=y"),
        );
        assert_eq!(session_cookie(&headers), Some("s3cret"));
        let mut other = HeaderMap::new();
        other.insert(header::COOKIE, HeaderValue::from_static("hotswap_uix=1"));
        assert_eq!(session_cookie(&other), None);
    }
}
