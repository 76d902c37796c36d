//! OpenTelemetry export: `otlp_endpoint` (or `LLM_METER_OTLP_ENDPOINT`, else the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT`), `otlp_headers` (or `OTEL_EXPORTER_OTLP_HEADERS`),
//! `otlp_metrics_interval`, and the resource (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use http::{HeaderName, HeaderValue, Uri};

use super::{ConfigError, invalid, parse_duration};

/// Our variable for the collector's base URL.
pub const ENDPOINT_ENV: &str = "LLM_METER_OTLP_ENDPOINT";
/// The OpenTelemetry SDKs' variable for it, read when ours is unset.
pub const OTEL_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
/// The SDKs' headers: `name=value,name=value`, values percent-encoded.
pub const OTEL_HEADERS_ENV: &str = "OTEL_EXPORTER_OTLP_HEADERS";
/// The SDKs' `service.name`.
pub const OTEL_SERVICE_NAME_ENV: &str = "OTEL_SERVICE_NAME";
/// The SDKs' other resource attributes: `name=value,name=value`.
pub const OTEL_RESOURCE_ENV: &str = "OTEL_RESOURCE_ATTRIBUTES";

/// Default `otlp_metrics_interval`: the metrics are pushed this often.
pub const DEFAULT_METRICS_INTERVAL: Duration = Duration::from_secs(10);
/// `service.name` unless `OTEL_SERVICE_NAME` says otherwise.
pub const SERVICE_NAME: &str = "llm-meter";

/// Where and how spans and metrics are pushed (OTLP over HTTP, protobuf).
#[derive(Debug, Clone)]
pub struct Settings {
    /// The collector's base URL (`http://collector:4318`): `/v1/traces` and `/v1/metrics` are
    /// posted under it.
    pub endpoint: Uri,
    /// Headers sent with every export (an `Authorization`, say): marked sensitive, so their
    /// values never print.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// How often the metrics are pushed; `None` (`"off"`) for traces only (Langfuse takes no
    /// metrics).
    pub metrics_interval: Option<Duration>,
    /// The resource's attributes, `service.name` first.
    pub resource: Vec<(String, String)>,
}

impl Settings {
    /// The URL of one signal's export: `/v1/traces` or `/v1/metrics` under the endpoint.
    pub fn url(&self, signal: &str) -> Option<Uri> {
        let base = self.endpoint.to_string();
        format!("{}/v1/{signal}", base.trim_end_matches('/'))
            .parse()
            .ok()
    }
}

/// The raw `otlp_*` fields of the file.
pub(super) struct File<'a> {
    pub(super) endpoint: Option<&'a str>,
    pub(super) headers: Option<&'a BTreeMap<String, String>>,
    pub(super) metrics_interval: Option<&'a str>,
}

/// The export settings, or `None` when no endpoint is set (export off: nothing is paid).
pub(super) fn settings(
    file: &File<'_>,
    env: &HashMap<String, String>,
    name: &str,
) -> Result<Option<Settings>, ConfigError> {
    let (endpoint, field, from) = if let Some(v) = env.get(ENDPOINT_ENV) {
        (
            v.as_str(),
            ENDPOINT_ENV,
            format!("environment variable {ENDPOINT_ENV}"),
        )
    } else if let Some(v) = file.endpoint {
        (v, "otlp_endpoint", name.to_owned())
    } else if let Some(v) = env.get(OTEL_ENDPOINT_ENV) {
        (
            v.as_str(),
            OTEL_ENDPOINT_ENV,
            format!("environment variable {OTEL_ENDPOINT_ENV}"),
        )
    } else {
        return Ok(None);
    };
    if endpoint.trim().is_empty() {
        return Ok(None);
    }
    let endpoint: Uri = endpoint
        .trim()
        .parse()
        .ok()
        .filter(|u: &Uri| {
            matches!(u.scheme_str(), Some("http" | "https")) && u.authority().is_some()
        })
        .ok_or_else(|| {
            invalid(
                field,
                &from,
                "must be an http(s) URL like http://collector:4318",
            )
        })?;
    let mut headers = Vec::new();
    if let Some(table) = file.headers {
        for (key, value) in table {
            headers.push(
                header(key, value).map_err(|r| invalid(&format!("otlp_headers.{key}"), name, r))?,
            );
        }
    } else if let Some(list) = env.get(OTEL_HEADERS_ENV) {
        let from = format!("environment variable {OTEL_HEADERS_ENV}");
        for (key, value) in pairs(list).map_err(|r| invalid(OTEL_HEADERS_ENV, &from, r))? {
            headers.push(header(&key, &value).map_err(|r| invalid(OTEL_HEADERS_ENV, &from, r))?);
        }
    }
    let metrics_interval = match file.metrics_interval {
        Some("off") => None,
        Some(v) => Some(
            parse_duration(v)
                .map_err(|r| invalid("otlp_metrics_interval", name, format!("{r}, or \"off\"")))?,
        ),
        None => Some(DEFAULT_METRICS_INTERVAL),
    };
    Ok(Some(Settings {
        endpoint,
        headers,
        metrics_interval,
        resource: resource(env)?,
    }))
}

/// One header, its value marked sensitive.
fn header(key: &str, value: &str) -> Result<(HeaderName, HeaderValue), String> {
    let name = HeaderName::try_from(key).map_err(|_| format!("{key:?} is not a header name"))?;
    let mut value = HeaderValue::try_from(value)
        .map_err(|_| format!("the value of {key:?} is not a valid header value"))?;
    value.set_sensitive(true);
    Ok((name, value))
}

/// `name=value,name=value` with percent-encoded values, as the OpenTelemetry SDKs read them.
fn pairs(list: &str) -> Result<Vec<(String, String)>, String> {
    list.split(',')
        .filter(|item| !item.trim().is_empty())
        .map(|item| {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| "takes name=value pairs separated by commas".to_owned())?;
            let value = percent_encoding::percent_decode_str(value.trim())
                .decode_utf8()
                .map_err(|_| format!("the value of {:?} is not UTF-8", key.trim()))?;
            Ok((key.trim().to_owned(), value.into_owned()))
        })
        .collect()
}

/// `service.name` (`OTEL_SERVICE_NAME`, else one in `OTEL_RESOURCE_ATTRIBUTES`, else
/// `llm-meter`) first, then the other attributes of `OTEL_RESOURCE_ATTRIBUTES`.
fn resource(env: &HashMap<String, String>) -> Result<Vec<(String, String)>, ConfigError> {
    let from = format!("environment variable {OTEL_RESOURCE_ENV}");
    let mut attributes = match env.get(OTEL_RESOURCE_ENV) {
        Some(list) => pairs(list).map_err(|r| invalid(OTEL_RESOURCE_ENV, &from, r))?,
        None => Vec::new(),
    };
    let named = attributes
        .iter()
        .position(|(k, _)| k == "service.name")
        .map(|at| attributes.remove(at).1);
    let service = env
        .get(OTEL_SERVICE_NAME_ENV)
        .filter(|s| !s.trim().is_empty())
        .cloned()
        .or(named)
        .unwrap_or_else(|| SERVICE_NAME.to_owned());
    attributes.insert(0, ("service.name".to_owned(), service));
    Ok(attributes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Flags};

    fn load(file: &str, env: &[(&str, &str)]) -> Result<Option<Settings>, ConfigError> {
        let flags = Flags {
            no_persist: true,
            ..Flags::default()
        };
        let env = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Config::from_layers(Some(file), None, &env, &flags).map(|c| c.otlp)
    }

    #[test]
    fn export_is_off_without_an_endpoint() {
        assert!(load("", &[]).unwrap().is_none());
    }

    #[test]
    fn our_variable_beats_the_file_which_beats_the_standard_one() {
        let file = "otlp_endpoint = \"http://file:4318\"";
        let ours = [
            (ENDPOINT_ENV, "http://ours:4318/"),
            (OTEL_ENDPOINT_ENV, "http://std:4318"),
        ];
        let settings = load(file, &ours).unwrap().unwrap();
        assert_eq!(
            settings.url("traces").unwrap(),
            "http://ours:4318/v1/traces"
        );
        let settings = load(file, &ours[1..]).unwrap().unwrap();
        assert_eq!(
            settings.url("metrics").unwrap(),
            "http://file:4318/v1/metrics"
        );
        let settings = load("", &ours[1..]).unwrap().unwrap();
        assert_eq!(settings.endpoint, "http://std:4318/");
        assert_eq!(settings.metrics_interval, Some(DEFAULT_METRICS_INTERVAL));
    }

    #[test]
    fn headers_are_sensitive_and_never_printed() {
        let file = "otlp_endpoint = \"http://c:4318\"\notlp_headers = { authorization = \"Basic c2VjcmV0\" }\notlp_metrics_interval = \"2s\"";
        let settings = load(file, &[]).unwrap().unwrap();
        assert_eq!(settings.headers.len(), 1);
        assert!(settings.headers[0].1.is_sensitive());
        assert!(!format!("{settings:?}").contains("c2VjcmV0"));
        assert_eq!(settings.metrics_interval, Some(Duration::from_secs(2)));
        let off = load(
            "otlp_endpoint = \"http://c\"\notlp_metrics_interval = \"off\"",
            &[],
        );
        assert_eq!(off.unwrap().unwrap().metrics_interval, None);
        let from_env = load(
            "otlp_endpoint = \"http://c:4318\"",
            &[(OTEL_HEADERS_ENV, "authorization=Basic%20eA==,x-scope=a")],
        )
        .unwrap()
        .unwrap();
        assert_eq!(from_env.headers[0].1, "Basic eA==");
        assert_eq!(from_env.headers.len(), 2);
    }

    #[test]
    fn bad_values_name_their_field() {
        let err = load("otlp_endpoint = \"collector:4318\"", &[]).unwrap_err();
        assert!(err.to_string().contains("otlp_endpoint"), "{err}");
        let err = load(
            "otlp_endpoint = \"http://c\"\notlp_metrics_interval = \"0s\"",
            &[],
        )
        .unwrap_err();
        assert!(err.to_string().contains("otlp_metrics_interval"), "{err}");
        let err = load(
            "otlp_endpoint = \"http://c\"\notlp_headers = { \"a b\" = \"x\" }",
            &[],
        )
        .unwrap_err();
        assert!(err.to_string().contains("otlp_headers"), "{err}");
    }

    #[test]
    fn the_service_is_named_by_the_standard_variables() {
        let file = "otlp_endpoint = \"http://c:4318\"";
        let settings = load(file, &[]).unwrap().unwrap();
        assert_eq!(
            settings.resource,
            [("service.name".to_owned(), SERVICE_NAME.to_owned())]
        );
        let env = [(
            OTEL_RESOURCE_ENV,
            "deployment.environment=prod,service.name=gw",
        )];
        let settings = load(file, &env).unwrap().unwrap();
        assert_eq!(settings.resource[0].1, "gw");
        assert_eq!(settings.resource[1].0, "deployment.environment");
        let env = [env[0], (OTEL_SERVICE_NAME_ENV, "meter-eu")];
        assert_eq!(load(file, &env).unwrap().unwrap().resource[0].1, "meter-eu");
    }
}
