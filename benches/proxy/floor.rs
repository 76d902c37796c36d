//! The floor: a bare hyper reverse proxy (no routing, no metering, no logging), built from the
//! same crates and runtime as llm-meter, so the benchmark shows what any hyper proxy costs here.

use std::convert::Infallible;
use std::net::SocketAddr;

use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// Serves forever on `listener`, forwarding every request to `upstream` over pooled connections.
pub async fn serve(listener: TcpListener, upstream: SocketAddr) {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> =
        Client::builder(TokioExecutor::new()).build(connector);
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let client = client.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
                let client = client.clone();
                async move {
                    let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
                    let uri = format!("http://{upstream}{path}")
                        .parse()
                        .expect("upstream URI");
                    *request.uri_mut() = uri;
                    let response = match client.request(request).await {
                        Ok(response) => response.map(BodyExt::boxed),
                        Err(_) => Response::builder()
                            .status(502)
                            .body(
                                Empty::new()
                                    .map_err(|never: Infallible| match never {})
                                    .boxed(),
                            )
                            .expect("response"),
                    };
                    Ok::<_, Infallible>(response)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}
