//! Upstreams: where each prefix is forwarded, in which API flavor; the built-in `openai` and
//! `anthropic` ones and those declared under `[upstreams.NAME]`.

use std::collections::BTreeMap;
use std::fmt;

use super::file::{FileConfig, UpstreamEntry};
use super::{
    ANTHROPIC, ConfigError, DEFAULT_ANTHROPIC_UPSTREAM, DEFAULT_UPSTREAM, Flags, Layers, OPENAI,
    env, invalid,
};
use crate::error::InvalidValue;

/// Our own endpoints: no upstream prefix may shadow them.
const RESERVED_PATHS: [&str; 9] = [
    "/stats",
    "/usage",
    "/export",
    "/healthz",
    "/admin",
    "/alerts",
    "/metrics",
    "/dashboard",
    "/estimate",
];
/// Where requests are forwarded: scheme and authority plus the base path they are appended to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// `http` or `https`.
    pub scheme: http::uri::Scheme,
    /// Host and port.
    pub authority: http::uri::Authority,
    /// Base path without a trailing slash (`/v1`, or empty).
    pub base_path: String,
    /// The `Host` header forwarded requests carry: the host, and the port unless it is the
    /// scheme's default (as HTTP clients write it).
    pub host: http::HeaderValue,
}

impl Upstream {
    /// Parses an absolute `http(s)://host[:port][/base]` URL.
    pub fn parse(url: &str) -> Result<Self, InvalidValue> {
        let uri: http::Uri = url.parse().map_err(|e| format!("{e}"))?;
        let scheme = uri
            .scheme()
            .cloned()
            .ok_or("must be an absolute URL such as https://api.openai.com/v1")?;
        if scheme != http::uri::Scheme::HTTP && scheme != http::uri::Scheme::HTTPS {
            return Err(InvalidValue(format!(
                "scheme must be http or https, not {scheme}"
            )));
        }
        let authority = uri.authority().cloned().ok_or("has no host")?;
        if uri.query().is_some() {
            return Err("must not have a query string".into());
        }
        let base_path = uri.path().trim_end_matches('/').to_owned();
        let default_port = if scheme == http::uri::Scheme::HTTPS {
            443
        } else {
            80
        };
        let host = match authority.port_u16() {
            Some(port) if port != default_port => format!("{}:{port}", authority.host()),
            _ => authority.host().to_owned(),
        };
        let host = http::HeaderValue::try_from(host).map_err(|_| "has an invalid host")?;
        Ok(Self {
            scheme,
            authority,
            base_path,
            host,
        })
    }
}

/// Which provider API an upstream speaks, and so which routes are metered and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiFlavor {
    /// OpenAI and OpenAI-compatible servers (OpenRouter, vLLM, llama.cpp, Ollama, Gemini's compatibility endpoint).
    OpenAi,
    /// Anthropic Messages.
    Anthropic,
    /// Gemini's native `generateContent` API.
    Gemini,
}

/// Whether llm-meter adds `stream_options.include_usage` to streaming requests that lack it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InjectStreamUsage {
    /// Add it; if the upstream rejects it with a 400 naming it, retry without it and stop adding it.
    Auto,
    /// Always add it.
    Always,
    /// Never add it: such streams are metered by estimate.
    Never,
}

/// A named upstream and the path prefix it is mounted at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The name shown in `/stats` and stored in the ledger.
    pub name: String,
    /// Our path prefix (`/v1`, `/anthropic/v1`, `/openrouter/v1`), stripped before forwarding.
    pub prefix: String,
    /// Where the rest of the path is appended.
    pub upstream: Upstream,
    /// The API it speaks.
    pub flavor: ApiFlavor,
    /// Whether to ask for stream usage on the client's behalf.
    pub inject_stream_usage: InjectStreamUsage,
    /// How it is reached: proxy, trusted certificates, HTTP/2.
    pub egress: super::egress::Egress,
}

impl Route {
    pub(super) fn new(name: &str, prefix: &str, upstream: Upstream, flavor: ApiFlavor) -> Self {
        Self {
            name: name.to_owned(),
            prefix: prefix.to_owned(),
            upstream,
            flavor,
            inject_stream_usage: InjectStreamUsage::Auto,
            egress: super::egress::Egress::default(),
        }
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}{}", self.scheme, self.authority, self.base_path)
    }
}

/// The upstream behind `/v1` (`upstream`).
pub(super) fn main(
    layer: &Layers<'_>,
    flags: &Flags,
    file: &FileConfig,
) -> Result<Upstream, ConfigError> {
    let (upstream, from) = layer.pick(
        flags.upstream.as_deref(),
        env::UPSTREAM,
        file.upstream.as_deref(),
        DEFAULT_UPSTREAM,
    );
    Upstream::parse(upstream).map_err(|r| invalid("upstream", &from, r))
}

/// Every route: `openai` at `/v1` to `main`, `anthropic` at `/anthropic/v1`, then `declared`.
pub(super) fn all(
    layer: &Layers<'_>,
    main: &Upstream,
    declared: BTreeMap<String, UpstreamEntry>,
) -> Result<Vec<Route>, ConfigError> {
    let anthropic = match layer.env.get(env::ANTHROPIC_UPSTREAM) {
        Some(url) => Upstream::parse(url).map_err(|r| {
            invalid(
                "upstreams.anthropic.url",
                &format!("environment variable {}", env::ANTHROPIC_UPSTREAM),
                r,
            )
        })?,
        None => Upstream::parse(DEFAULT_ANTHROPIC_UPSTREAM)
            .map_err(|r| invalid("upstreams.anthropic.url", "default", r))?,
    };
    routes(
        Route::new(OPENAI, "/v1", main.clone(), ApiFlavor::OpenAi),
        Route::new(ANTHROPIC, "/anthropic/v1", anthropic, ApiFlavor::Anthropic),
        declared,
        layer.file_name,
    )
}

/// The built-in routes with the file's `[upstreams.*]` applied: `openai` may set only
/// `inject_stream_usage` (its URL is `upstream`), `anthropic` may be re-pointed, others are added.
pub(super) fn routes(
    openai: Route,
    anthropic: Route,
    declared: BTreeMap<String, UpstreamEntry>,
    file: &str,
) -> Result<Vec<Route>, ConfigError> {
    let mut routes = vec![openai, anthropic];
    for (name, entry) in declared {
        let field = |part: &str| format!("upstreams.{name}.{part}");
        if !is_plain_name(&name) {
            return Err(invalid(
                &format!("upstreams.{name}"),
                file,
                "a name may only have letters, digits, '-' and '_'",
            ));
        }
        let existing = routes.iter().position(|r| r.name == name);
        if name == OPENAI
            && (entry.url.is_some() || entry.prefix.is_some() || entry.flavor.is_some())
        {
            return Err(invalid(
                &field("url"),
                file,
                "the openai upstream's URL is the top-level `upstream` setting; only inject_stream_usage, proxy, ca_file and http2 may be set here",
            ));
        }
        let mut route = match existing {
            Some(at) => routes.remove(at),
            None => {
                let url = entry.url.as_deref().ok_or_else(|| {
                    invalid(
                        &field("url"),
                        file,
                        "missing: where this upstream's requests go",
                    )
                })?;
                let upstream = Upstream::parse(url).map_err(|r| invalid(&field("url"), file, r))?;
                Route::new(&name, &format!("/{name}/v1"), upstream, ApiFlavor::OpenAi)
            }
        };
        if let Some(url) = entry.url.as_deref() {
            route.upstream = Upstream::parse(url).map_err(|r| invalid(&field("url"), file, r))?;
        }
        if let Some(flavor) = entry.flavor.as_deref() {
            route.flavor = match flavor {
                "openai" => ApiFlavor::OpenAi,
                "anthropic" => ApiFlavor::Anthropic,
                "gemini" => ApiFlavor::Gemini,
                other => {
                    return Err(invalid(
                        &field("flavor"),
                        file,
                        format!("expected \"openai\", \"anthropic\" or \"gemini\", got {other:?}"),
                    ));
                }
            };
        }
        if let Some(prefix) = entry.prefix {
            route.prefix = prefix.trim_end_matches('/').to_owned();
        }
        if let Some(inject) = entry.inject_stream_usage.as_deref() {
            route.inject_stream_usage = match inject {
                "auto" => InjectStreamUsage::Auto,
                "always" => InjectStreamUsage::Always,
                "never" => InjectStreamUsage::Never,
                other => {
                    return Err(invalid(
                        &field("inject_stream_usage"),
                        file,
                        format!("expected \"auto\", \"always\" or \"never\", got {other:?}"),
                    ));
                }
            };
        }
        check_prefix(&route.prefix, &routes).map_err(|r| invalid(&field("prefix"), file, r))?;
        let at = existing.unwrap_or(routes.len()).min(routes.len());
        routes.insert(at, route);
    }
    Ok(routes)
}

/// Names of upstreams and keys: letters, digits, `-` and `_` (they appear in paths, JSON and logs).
pub(super) fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A prefix is a plain absolute path, apart from our own endpoints and every other prefix.
fn check_prefix(prefix: &str, others: &[Route]) -> Result<(), String> {
    let is_plain = prefix.starts_with('/')
        && prefix.len() > 1
        && prefix.split('/').skip(1).all(|segment| {
            !segment.is_empty()
                && segment != "."
                && segment != ".."
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.~".contains(&b))
        });
    if !is_plain {
        return Err(format!(
            "{prefix:?} must be an absolute path of plain segments, such as \"/openrouter/v1\""
        ));
    }
    let nests = |a: &str, b: &str| a == b || a.starts_with(&format!("{b}/"));
    if let Some(own) = RESERVED_PATHS
        .iter()
        .find(|own| nests(prefix, own) || nests(own, prefix))
    {
        return Err(format!("{prefix:?} would hide llm-meter's own {own}"));
    }
    if let Some(other) = others
        .iter()
        .find(|r| nests(prefix, &r.prefix) || nests(&r.prefix, prefix))
    {
        return Err(format!(
            "{prefix:?} overlaps the prefix {:?} of upstream {:?}",
            other.prefix, other.name
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Flags, OnClientDisconnect, env};
    use std::collections::HashMap;
    use std::time::Duration;

    #[test]
    fn no_prefix_may_hide_an_own_endpoint_the_dashboard_included() {
        for prefix in ["/stats", "/admin/v1", "/dashboard", "/dashboard/v1"] {
            let reason = check_prefix(prefix, &[]).unwrap_err();
            assert!(reason.contains("would hide"), "{prefix}: {reason}");
        }
        assert!(check_prefix("/dash/v1", &[]).is_ok());
    }

    fn load(file: &str, env_pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut env: HashMap<String, String> = env_pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        env.insert(env::HOME.into(), "/home/ada".into());
        Config::from_layers(Some(file), None, &env, &Flags::default())
    }

    fn error(file: &str) -> String {
        load(file, &[]).unwrap_err().to_string()
    }

    #[test]
    fn openai_and_anthropic_are_mounted_with_no_config() {
        let c = load("", &[]).unwrap();
        let mounted: Vec<(&str, &str, String, ApiFlavor)> = c
            .routes
            .iter()
            .map(|r| {
                (
                    r.name.as_str(),
                    r.prefix.as_str(),
                    r.upstream.to_string(),
                    r.flavor,
                )
            })
            .collect();
        assert_eq!(
            mounted,
            [
                (
                    "openai",
                    "/v1",
                    DEFAULT_UPSTREAM.to_owned(),
                    ApiFlavor::OpenAi
                ),
                (
                    "anthropic",
                    "/anthropic/v1",
                    DEFAULT_ANTHROPIC_UPSTREAM.to_owned(),
                    ApiFlavor::Anthropic
                ),
            ]
        );
        assert_eq!(c.on_client_disconnect, OnClientDisconnect::Close);
    }

    #[test]
    fn declared_upstreams_get_a_prefix_from_their_name_unless_given_one() {
        let c = load(
            r#"
            [upstreams.ollama]
            url = "http://localhost:11434/v1"
            inject_stream_usage = "never"
            [upstreams.gemini]
            prefix = "/gemini/v1beta/"
            url = "https://generativelanguage.googleapis.com/v1beta"
            flavor = "gemini"
            [upstreams.anthropic]
            url = "https://anthropic.example.com/v1"
            "#,
            &[],
        )
        .unwrap();
        let by_name = |name: &str| c.routes.iter().find(|r| r.name == name).unwrap();
        assert_eq!(by_name("ollama").prefix, "/ollama/v1");
        assert_eq!(
            by_name("ollama").inject_stream_usage,
            InjectStreamUsage::Never
        );
        assert_eq!(by_name("gemini").prefix, "/gemini/v1beta");
        assert_eq!(by_name("gemini").flavor, ApiFlavor::Gemini);
        assert_eq!(
            by_name("anthropic").upstream.to_string(),
            "https://anthropic.example.com/v1"
        );
        assert_eq!(by_name("anthropic").prefix, "/anthropic/v1");
        assert_eq!(c.routes.len(), 4);
    }

    #[test]
    fn the_anthropic_upstream_can_come_from_the_environment() {
        let c = load("", &[(env::ANTHROPIC_UPSTREAM, "http://127.0.0.1:7/v1")]).unwrap();
        assert_eq!(c.routes[1].upstream.to_string(), "http://127.0.0.1:7/v1");
    }

    #[test]
    fn bad_upstreams_are_refused_with_the_field_named() {
        for (file, expected) in [
            ("[upstreams.x]\nprefix = \"/x\"", "`upstreams.x.url`"),
            ("[upstreams.x]\nurl = \"ftp://h\"", "`upstreams.x.url`"),
            (
                "[upstreams.x]\nurl = \"http://h\"\nflavor = \"cohere\"",
                "`upstreams.x.flavor`",
            ),
            (
                "[upstreams.x]\nurl = \"http://h\"\ninject_stream_usage = \"sometimes\"",
                "`upstreams.x.inject_stream_usage`",
            ),
            (
                "[upstreams.x]\nurl = \"http://h\"\nprefix = \"/v1\"",
                "overlaps",
            ),
            (
                "[upstreams.x]\nurl = \"http://h\"\nprefix = \"/v1/x\"",
                "overlaps",
            ),
            (
                "[upstreams.x]\nurl = \"http://h\"\nprefix = \"/stats\"",
                "llm-meter's own /stats",
            ),
            (
                "[upstreams.x]\nurl = \"http://h\"\nprefix = \"/metrics\"",
                "llm-meter's own /metrics",
            ),
            (
                "[upstreams.x]\nurl = \"http://h\"\nprefix = \"x\"",
                "absolute path",
            ),
            (
                "[upstreams.x]\nurl = \"http://h\"\nprefix = \"/a/../b\"",
                "absolute path",
            ),
            (
                "[upstreams.openai]\nurl = \"http://h\"",
                "top-level `upstream`",
            ),
            ("[upstreams.\"a b\"]\nurl = \"http://h\"", "letters, digits"),
            ("on_client_disconnect = \"wait\"", "`on_client_disconnect`"),
        ] {
            let message = error(file);
            assert!(message.contains(expected), "{file:?}: {message}");
        }
    }

    #[test]
    fn drain_mode_and_its_timeout_are_read() {
        let c = load(
            "on_client_disconnect = \"drain\"\ndrain_timeout = \"30s\"",
            &[],
        )
        .unwrap();
        assert_eq!(c.on_client_disconnect, OnClientDisconnect::Drain);
        assert_eq!(c.drain_timeout, Duration::from_secs(30));
    }
}
