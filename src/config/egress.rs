//! How upstreams are reached: through which egress proxy (`proxy`, else `HTTPS_PROXY`,
//! `HTTP_PROXY` and `ALL_PROXY` less `NO_PROXY`), trusting which certificates (`tls_roots`,
//! `SSL_CERT_FILE`, `SSL_CERT_DIR`, `ca_file`), over HTTP/2 or not; globally and per upstream.

use std::collections::{BTreeMap, HashMap};

use http::uri::{Authority, Scheme};

use super::file::{FileConfig, Http2Entry, UpstreamEntry};
use super::{ConfigError, Route, invalid};
use crate::client::egress::{is_loopback, port_of};
use crate::client::{Http2, NoProxy, ProxyServer, TlsRoots, Trust};

/// The variables that name proxies, in the order they are looked at for each scheme: the
/// lower-case spelling first, as curl and Python read them.
const HTTPS_PROXY_VARS: [&str; 4] = ["https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"];
const HTTP_PROXY_VARS: [&str; 4] = ["http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"];
const NO_PROXY_VARS: [&str; 2] = ["no_proxy", "NO_PROXY"];

/// How one upstream is reached.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Egress {
    /// The proxy its connections go through, and where that was set (for the start-up log).
    pub proxy: Option<(ProxyServer, String)>,
    /// What its TLS trusts.
    pub trust: Trust,
    /// When it is spoken to in HTTP/2.
    pub http2: Http2,
}

/// The global rules, which every upstream follows unless its own table says otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rules {
    /// The proxy for `https` upstreams, and where it was set.
    https: Option<(ProxyServer, String)>,
    /// The proxy for `http` upstreams, and where it was set.
    http: Option<(ProxyServer, String)>,
    no_proxy: NoProxy,
    /// What TLS trusts unless an upstream adds its own `ca_file`.
    pub trust: Trust,
}

impl Rules {
    /// Reads the settings, or the environment where they are absent.
    pub(super) fn load(
        env: &HashMap<String, String>,
        file: &FileConfig,
        file_name: &str,
    ) -> Result<Self, ConfigError> {
        let set = |name: &str| env.get(name).filter(|v| !v.trim().is_empty());
        let from_env = |vars: &[&str]| -> Result<Option<(ProxyServer, String)>, ConfigError> {
            let Some((name, url)) = vars.iter().find_map(|n| set(n).map(|v| (*n, v))) else {
                return Ok(None);
            };
            let from = format!("environment variable {name}");
            let proxy = ProxyServer::parse(url).map_err(|r| {
                invalid(
                    "proxy",
                    &from,
                    format!("{r}; set proxy = \"\" to go direct"),
                )
            })?;
            Ok(Some((proxy, from)))
        };
        let (https, http) = match file.proxy.as_deref().map(str::trim) {
            Some("") => (None, None),
            Some(url) => {
                let proxy = ProxyServer::parse(url).map_err(|r| invalid("proxy", file_name, r))?;
                let set = Some((proxy, file_name.to_owned()));
                (set.clone(), set)
            }
            None => (from_env(&HTTPS_PROXY_VARS)?, from_env(&HTTP_PROXY_VARS)?),
        };
        let no_proxy = match &file.no_proxy {
            Some(list) => NoProxy::parse(list),
            None => NO_PROXY_VARS
                .iter()
                .find_map(|n| env.get(*n))
                .map(|list| NoProxy::parse(list))
                .unwrap_or_default(),
        };
        let roots = match file.tls_roots.as_deref() {
            None => TlsRoots::default(),
            Some(word) => TlsRoots::parse(word).ok_or_else(|| {
                invalid(
                    "tls_roots",
                    file_name,
                    format!("expected \"webpki\", \"system\" or \"both\", got {word:?}"),
                )
            })?,
        };
        let mut trust = Trust {
            roots,
            ..Trust::default()
        };
        trust.files.extend(set("SSL_CERT_FILE").map(Into::into));
        if let Some(dirs) = set("SSL_CERT_DIR") {
            trust
                .dirs
                .extend(std::env::split_paths(dirs).filter(|d| !d.as_os_str().is_empty()));
        }
        trust.files.extend(file.ca_file.clone());
        Ok(Self {
            https,
            http,
            no_proxy,
            trust,
        })
    }

    /// The way to `scheme://authority` under the global rules: loopback hosts and those
    /// `NO_PROXY` names go direct.
    pub fn for_target(&self, scheme: &Scheme, authority: &Authority) -> Egress {
        let port = port_of(scheme, authority);
        let host = authority.host();
        let proxy = if *scheme == Scheme::HTTPS {
            &self.https
        } else {
            &self.http
        };
        let direct = is_loopback(host) || self.no_proxy.matches(host, port);
        Egress {
            proxy: proxy.clone().filter(|_| !direct),
            trust: self.trust.clone(),
            http2: Http2::default(),
        }
    }
}

/// An upstream's own `proxy`, `ca_file` and `http2`, read before its table is consumed.
#[derive(Debug, Default)]
pub(super) struct Own {
    /// `Some(None)`: `proxy = ""`, direct.
    proxy: Option<Option<ProxyServer>>,
    ca_file: Option<std::path::PathBuf>,
    http2: Option<Http2>,
}

/// Reads every `[upstreams.NAME]`'s own egress settings.
pub(super) fn own_settings(
    upstreams: &BTreeMap<String, UpstreamEntry>,
    file_name: &str,
) -> Result<BTreeMap<String, Own>, ConfigError> {
    let mut own = BTreeMap::new();
    for (name, entry) in upstreams {
        let field = |part: &str| format!("upstreams.{name}.{part}");
        let proxy = match entry.proxy.as_deref().map(str::trim) {
            None => None,
            Some("") => Some(None),
            Some(url) => Some(Some(
                ProxyServer::parse(url).map_err(|r| invalid(&field("proxy"), file_name, r))?,
            )),
        };
        let http2 = match &entry.http2 {
            None => None,
            Some(Http2Entry::Switch(true)) => Some(Http2::Offered),
            Some(Http2Entry::Switch(false)) => Some(Http2::Off),
            Some(Http2Entry::Word(word)) if word == "prior-knowledge" => {
                Some(Http2::PriorKnowledge)
            }
            Some(Http2Entry::Word(word)) => {
                return Err(invalid(
                    &field("http2"),
                    file_name,
                    format!("expected true, false or \"prior-knowledge\", got {word:?}"),
                ));
            }
        };
        own.insert(
            name.clone(),
            Own {
                proxy,
                ca_file: entry.ca_file.clone(),
                http2,
            },
        );
    }
    Ok(own)
}

/// Gives every route its way out: the global rules, then its own settings (an upstream's own
/// `proxy` applies even to a loopback host: it was asked for by name).
pub(super) fn resolve(
    rules: &Rules,
    routes: &mut [Route],
    own: &BTreeMap<String, Own>,
    file_name: &str,
) {
    for route in routes {
        let mut egress = rules.for_target(&route.upstream.scheme, &route.upstream.authority);
        if let Some(own) = own.get(&route.name) {
            if let Some(proxy) = &own.proxy {
                egress.proxy = proxy
                    .clone()
                    .map(|p| (p, format!("{file_name} [upstreams.{}]", route.name)));
            }
            egress.trust.files.extend(own.ca_file.clone());
            if let Some(http2) = own.http2 {
                egress.http2 = http2;
            }
        }
        route.egress = egress;
    }
}

#[cfg(test)]
mod tests {
    use crate::client::Http2;
    use crate::config::{Config, ConfigError, Flags};
    use std::collections::HashMap;

    fn load(file: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        env.insert("HOME".into(), "/home/ada".into());
        Config::from_layers(Some(file), None, &env, &Flags::default())
    }

    /// The proxy of the upstream named `name`, as shown (never with credentials).
    fn proxy_of(config: &Config, name: &str) -> Option<String> {
        let route = config.routes.iter().find(|r| r.name == name).unwrap();
        route
            .egress
            .proxy
            .as_ref()
            .map(|(p, from)| format!("{p} ({from})"))
    }

    #[test]
    fn the_lower_case_variable_wins_and_all_proxy_is_the_fallback() {
        let config = load(
            "",
            &[
                ("https_proxy", "http://lower:1"),
                ("HTTPS_PROXY", "http://upper:2"),
                ("ALL_PROXY", "http://all:3"),
            ],
        )
        .unwrap();
        assert_eq!(
            proxy_of(&config, "openai").unwrap(),
            "http://lower:1 (environment variable https_proxy)"
        );
        let config = load("", &[("ALL_PROXY", "all:3")]).unwrap();
        assert_eq!(
            proxy_of(&config, "anthropic").unwrap(),
            "http://all:3 (environment variable ALL_PROXY)"
        );
        // An empty variable is no proxy.
        let config = load("", &[("HTTPS_PROXY", " ")]).unwrap();
        assert_eq!(proxy_of(&config, "openai"), None);
    }

    #[test]
    fn http_upstreams_read_http_proxy_and_https_ones_https_proxy() {
        let file = "[upstreams.gw]\nurl = \"http://gw.internal:8000/v1\"\n";
        let env = [
            ("HTTP_PROXY", "http://p:80"),
            ("HTTPS_PROXY", "http://s:443"),
        ];
        let config = load(file, &env).unwrap();
        assert!(proxy_of(&config, "gw").unwrap().starts_with("http://p:80"));
        assert!(
            proxy_of(&config, "openai")
                .unwrap()
                .starts_with("http://s:443")
        );
    }

    #[test]
    fn settings_are_read_and_bad_ones_are_refused_by_name() {
        let file = "proxy = \"http://u:p@corp:3128\"\nno_proxy = \"openai.com\"\n\
                    [upstreams.local]\nurl = \"http://127.0.0.1:9/v1\"\nproxy = \"http://side:1\"\nhttp2 = \"prior-knowledge\"\n\
                    [upstreams.anthropic]\nhttp2 = false\nproxy = \"\"\n";
        let config = load(file, &[("HTTPS_PROXY", "http://ignored:1")]).unwrap();
        assert_eq!(proxy_of(&config, "openai"), None, "no_proxy matched");
        assert_eq!(proxy_of(&config, "anthropic"), None, "its own proxy = \"\"");
        assert!(
            proxy_of(&config, "local")
                .unwrap()
                .starts_with("http://side:1")
        );
        let http2 = |name: &str| {
            config
                .routes
                .iter()
                .find(|r| r.name == name)
                .unwrap()
                .egress
                .http2
        };
        assert_eq!(http2("local"), Http2::PriorKnowledge);
        assert_eq!(http2("anthropic"), Http2::Off);
        assert_eq!(http2("openai"), Http2::Offered);

        for (bad, field) in [
            ("proxy = \"socks5://x:1\"", "`proxy`"),
            ("tls_roots = \"mozilla\"", "`tls_roots`"),
            (
                "[upstreams.openai]\nhttp2 = \"yes\"",
                "`upstreams.openai.http2`",
            ),
            (
                "[upstreams.openai]\nproxy = \"ftp://x\"",
                "`upstreams.openai.proxy`",
            ),
        ] {
            let err = load(bad, &[]).unwrap_err().to_string();
            assert!(err.contains(field), "{bad}: {err}");
        }
    }
}
