//! Who may use the service. Bound to a loopback address without a token,
//! it answers requests whose `Host` is a loopback name only (so a web page
//! cannot reach it through a DNS name rebound to 127.0.0.1). With a token
//! (required for any other address) every request must carry it: as
//! `Authorization: Bearer TOKEN`, as the cookie the page gets, or once as
//! `?token=TOKEN` in the page's address, which sets that cookie.

use hyper::header::{HeaderMap, AUTHORIZATION, COOKIE, HOST};

/// The cookie that carries the token.
pub const COOKIE_NAME: &str = "vmm_hostd_token";

/// What a request showed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// Allowed through `?token=`: set the cookie in the answer.
    AllowedSetCookie,
    Denied,
}

/// Compares without stopping at the first difference.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn loopback_host(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(HOST).and_then(|h| h.to_str().ok()) else {
        // HTTP/1.0 without Host, or a unix socket client: not a browser.
        return true;
    };
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.split(':').next().unwrap_or("")
    };
    matches!(name, "localhost" | "127.0.0.1" | "::1")
}

/// Decides on a request with `headers` and `query`, given the configured
/// `token`.
pub fn check(token: Option<&str>, headers: &HeaderMap, query: Option<&str>) -> Verdict {
    let Some(token) = token else {
        return if loopback_host(headers) {
            Verdict::Allowed
        } else {
            Verdict::Denied
        };
    };
    let bearer = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let cookie = headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(COOKIE_NAME)?.strip_prefix('='));
    if bearer.into_iter().chain(cookie).any(|t| same(t, token)) {
        return Verdict::Allowed;
    }
    let in_query = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter_map(|kv| kv.strip_prefix("token="))
        .any(|t| same(t, token));
    if in_query {
        Verdict::AllowedSetCookie
    } else {
        Verdict::Denied
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn headers(pairs: &[(hyper::header::HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(k.clone(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn without_a_token_only_loopback_hosts_pass() {
        let ok = headers(&[(HOST, "127.0.0.1:9178")]);
        let ok6 = headers(&[(HOST, "[::1]:9178")]);
        let rebound = headers(&[(HOST, "evil.example:9178")]);

        assert_eq!(check(None, &ok, None), Verdict::Allowed);
        assert_eq!(check(None, &ok6, None), Verdict::Allowed);
        assert_eq!(check(None, &rebound, None), Verdict::Denied);
    }

    #[test]
    fn with_a_token_it_must_come_as_bearer_cookie_or_query() {
        let none = headers(&[(HOST, "127.0.0.1")]);
        let bearer = headers(&[(AUTHORIZATION, "Bearer s3cret")]);
        let cookie = headers(&[(COOKIE, "a=b; vmm_hostd_token=s3cret")]);
        let wrong = headers(&[(AUTHORIZATION, "Bearer s3cres")]);

        assert_eq!(check(Some("s3cret"), &none, None), Verdict::Denied);
        assert_eq!(check(Some("s3cret"), &bearer, None), Verdict::Allowed);
        assert_eq!(check(Some("s3cret"), &cookie, None), Verdict::Allowed);
        assert_eq!(check(Some("s3cret"), &wrong, None), Verdict::Denied);
        assert_eq!(
            check(Some("s3cret"), &none, Some("x=1&token=s3cret")),
            Verdict::AllowedSetCookie
        );
    }
}
