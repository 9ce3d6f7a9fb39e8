//! Opening one RFB-over-WebSocket connection: TCP (optionally from a chosen local source
//! address), TLS for `wss://`, then the WebSocket upgrade. Shared by [`crate::swarm`] and
//! [`crate::idle`], together with the names they give to the ways a connection fails.
//!
//! * `ws://` without a source address does exactly what `tokio_tungstenite::connect_async`
//!   does: `TcpStream::connect("HOST:PORT")` (every resolved address in turn), `TCP_NODELAY`
//!   when asked, the client handshake.
//! * With a source address the socket is bound to `SOURCE:0` before connecting, so many
//!   loopback sources (127.0.0.1, 127.0.0.2, ...) multiply the ephemeral ports available
//!   towards one server address.
//! * `wss://` runs a rustls handshake (ring provider, selected explicitly: nothing depends
//!   on a process-wide default provider) before the upgrade. Certificates are verified
//!   against the bundled webpki (Mozilla) roots by default, or against the certificates of
//!   a PEM file ([`Tls::CaFile`]); [`Tls::Insecure`] skips verification (lab use only).

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::{Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, header};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, error::UrlError};

/// How `wss://` servers are authenticated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Tls {
    /// The bundled webpki (Mozilla) root certificates.
    #[default]
    WebPkiRoots,
    /// Only the certificates in this PEM file (a private CA, or a self-signed server
    /// certificate), instead of the bundled roots.
    CaFile(PathBuf),
    /// No certificate verification at all: anyone in the middle can read and change the
    /// traffic. For lab setups with throwaway certificates.
    Insecure,
}

/// The crypto provider every TLS config here is built with: ring, chosen explicitly so no
/// process-wide default has to be installed (and two linked providers cannot make rustls
/// panic over which one to use).
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the rustls client configuration for `tls`; errors name the file or the problem.
pub fn client_config(tls: &Tls) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = crypto_provider();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?;
    let config = match tls {
        Tls::WebPkiRoots => {
            let roots = RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            };
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Tls::CaFile(path) => builder
            .with_root_certificates(load_ca(path)?)
            .with_no_client_auth(),
        Tls::Insecure => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
            .with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// The certificates of a PEM file as trust anchors.
fn load_ca(path: &Path) -> Result<RootCertStore, String> {
    let shown = path.display();
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path).map_err(|e| format!("--ca {shown}: {e}"))?;
    for cert in certs {
        let cert = cert.map_err(|e| format!("--ca {shown}: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("--ca {shown}: unusable certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err(format!("--ca {shown}: no PEM certificate in the file"));
    }
    Ok(roots)
}

/// Accepts any server certificate; handshake signatures are still checked (so the session
/// keys are at least bound to the certificate presented).
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The byte stream under a WebSocket: plain TCP or TLS over TCP.
#[derive(Debug)]
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A WebSocket opened by [`Dialer::connect`].
pub type Ws = WebSocketStream<Stream>;

/// Why a connection could not be opened.
#[derive(Debug)]
pub enum DialError {
    /// TCP connect, HTTP upgrade or URL problems, as tungstenite reports them.
    Ws(tungstenite::Error),
    /// The socket could not be bound to the source address.
    Bind(IpAddr, io::Error),
    /// The TLS handshake failed (certificate not trusted, wrong name, not TLS at all...).
    Tls(io::Error),
}

impl DialError {
    /// A short stable name for the error maps of the reports (`connect_refused`,
    /// `http_404`, `tls_unknown_issuer`, `bind_addr_not_available`, ...).
    pub fn kind(&self) -> String {
        match self {
            DialError::Ws(e) => ws_connect_error_kind(e),
            DialError::Bind(_, e) => format!("bind_{}", io_kind_name(e)),
            DialError::Tls(e) => tls_error_kind(e).into(),
        }
    }
}

impl fmt::Display for DialError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DialError::Ws(e) => write!(f, "{e}"),
            DialError::Bind(ip, e) => write!(f, "cannot bind source address {ip}: {e}"),
            DialError::Tls(e) => write!(f, "TLS handshake failed: {e}"),
        }
    }
}

impl std::error::Error for DialError {}

/// Opens WebSocket connections to one kind of URL (`ws://` or `wss://`).
#[derive(Clone)]
/// A run that cannot start: its URL, or another of its settings, is unusable.
#[derive(Debug)]
pub enum SetupError {
    BadUrl(String),
    BadSetting(String),
}

impl fmt::Display for SetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SetupError::BadUrl(m) => write!(f, "bad url: {m}"),
            SetupError::BadSetting(m) => write!(f, "bad setting: {m}"),
        }
    }
}

impl std::error::Error for SetupError {}

/// The upgrade request for `url` (`ws://` or `wss://`), offering `subprotocol` when given,
/// and whether it is `wss://`. Each session sends a clone of it.
pub fn upgrade_request(
    url: &str,
    subprotocol: Option<&str>,
) -> Result<(Request, bool), SetupError> {
    let mut request = url
        .into_client_request()
        .map_err(|e| SetupError::BadUrl(e.to_string()))?;
    let secure = match request.uri().scheme_str() {
        Some("ws") => false,
        Some("wss") => true,
        other => {
            return Err(SetupError::BadUrl(format!(
                "scheme {other:?}, want ws or wss"
            )));
        }
    };
    if let Some(p) = subprotocol {
        let v = HeaderValue::from_str(p)
            .map_err(|e| SetupError::BadSetting(format!("subprotocol: {e}")))?;
        request
            .headers_mut()
            .insert(header::SEC_WEBSOCKET_PROTOCOL, v);
    }
    Ok((request, secure))
}

pub struct Dialer {
    tls: Option<TlsConnector>,
    ws_config: Option<WebSocketConfig>,
    nodelay: bool,
}

impl Dialer {
    /// `tls` is only used (and its CA file only read) for `wss://`; `ws_config` `None` is
    /// tungstenite's default.
    pub fn new(
        secure: bool,
        tls: &Tls,
        ws_config: Option<WebSocketConfig>,
        nodelay: bool,
    ) -> Result<Dialer, String> {
        let tls = if secure {
            Some(TlsConnector::from(client_config(tls)?))
        } else {
            None
        };
        Ok(Dialer {
            tls,
            ws_config,
            nodelay,
        })
    }

    /// TCP (from `source` when given), TLS for `wss://`, then the WebSocket upgrade.
    pub async fn connect(
        &self,
        request: Request,
        source: Option<IpAddr>,
    ) -> Result<(Ws, Response), DialError> {
        let domain = domain(&request)?;
        let secure = match request.uri().scheme_str() {
            Some("wss") => true,
            Some("ws") => false,
            _ => return Err(DialError::Ws(UrlError::UnsupportedUrlScheme.into())),
        };
        let port = request
            .uri()
            .port_u16()
            .unwrap_or(if secure { 443 } else { 80 });
        let tcp = match source {
            None => TcpStream::connect(format!("{domain}:{port}"))
                .await
                .map_err(|e| DialError::Ws(e.into()))?,
            Some(ip) => connect_from(ip, &domain, port).await?,
        };
        if self.nodelay {
            tcp.set_nodelay(true).map_err(|e| DialError::Ws(e.into()))?;
        }
        let stream = if secure {
            let Some(tls) = &self.tls else {
                return Err(DialError::Ws(UrlError::TlsFeatureNotEnabled.into()));
            };
            let name = ServerName::try_from(domain.clone())
                .map_err(|_| DialError::Ws(tungstenite::Error::Url(UrlError::NoHostName)))?;
            let tls = tls.connect(name, tcp).await.map_err(DialError::Tls)?;
            Stream::Tls(Box::new(tls))
        } else {
            Stream::Plain(tcp)
        };
        tokio_tungstenite::client_async_with_config(request, stream, self.ws_config)
            .await
            .map_err(DialError::Ws)
    }
}

/// The URL's host without IPv6 brackets (as tokio-tungstenite does it).
fn domain(request: &Request) -> Result<String, DialError> {
    let host = request
        .uri()
        .host()
        .ok_or(DialError::Ws(tungstenite::Error::Url(UrlError::NoHostName)))?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    Ok(host.to_owned())
}

/// Connects from `source:0` to the first resolved address of the source's family.
async fn connect_from(source: IpAddr, domain: &str, port: u16) -> Result<TcpStream, DialError> {
    let addrs = tokio::net::lookup_host((domain, port))
        .await
        .map_err(|e| DialError::Ws(e.into()))?;
    let Some(addr) = addrs.into_iter().find(|a| a.is_ipv4() == source.is_ipv4()) else {
        return Err(DialError::Bind(
            source,
            io::Error::new(
                io::ErrorKind::AddrNotAvailable,
                format!("{domain} has no address of the source address's family"),
            ),
        ));
    };
    let socket = if source.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| DialError::Ws(e.into()))?;
    socket
        .bind(SocketAddr::new(source, 0))
        .map_err(|e| DialError::Bind(source, e))?;
    socket
        .connect(addr)
        .await
        .map_err(|e| DialError::Ws(e.into()))
}

/// `EMFILE`/`ENFILE`: out of file descriptors (ours), worth its own name.
fn out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(23 | 24))
}

/// `connection_refused` style name of an I/O error kind.
fn io_kind_name(e: &io::Error) -> String {
    use io::ErrorKind;
    if out_of_descriptors(e) {
        return "emfile".into();
    }
    match e.kind() {
        ErrorKind::ConnectionRefused => "refused".into(),
        ErrorKind::TimedOut => "timeout".into(),
        ErrorKind::ConnectionReset => "reset".into(),
        ErrorKind::UnexpectedEof => "eof".into(),
        ErrorKind::AddrNotAvailable => "addr_not_available".into(),
        ErrorKind::AddrInUse => "addr_in_use".into(),
        other => format!("io_{}", format!("{other:?}").to_lowercase()),
    }
}

/// Name of a failed connect + upgrade.
pub fn ws_connect_error_kind(e: &tungstenite::Error) -> String {
    use io::ErrorKind;
    match e {
        tungstenite::Error::Io(io) if out_of_descriptors(io) => "emfile".into(),
        tungstenite::Error::Io(io) => match io.kind() {
            ErrorKind::ConnectionRefused => "connect_refused".into(),
            ErrorKind::TimedOut => "connect_timeout".into(),
            ErrorKind::ConnectionReset => "connect_reset".into(),
            ErrorKind::UnexpectedEof => "connect_eof".into(),
            ErrorKind::AddrNotAvailable => "connect_addr_not_available".into(),
            other => format!("connect_io_{}", format!("{other:?}").to_lowercase()),
        },
        tungstenite::Error::Http(resp) => format!("http_{}", resp.status().as_u16()),
        tungstenite::Error::HttpFormat(_) => "http_format".into(),
        tungstenite::Error::Url(_) => "bad_url".into(),
        tungstenite::Error::Tls(_) => "tls".into(),
        tungstenite::Error::Protocol(_) => "ws_handshake".into(),
        _ => "connect_other".into(),
    }
}

/// Name of a failed TLS handshake: what rustls said, when it said something.
pub fn tls_error_kind(e: &io::Error) -> &'static str {
    let inner = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    match inner {
        Some(rustls::Error::InvalidCertificate(c)) => match c {
            CertificateError::UnknownIssuer => "tls_unknown_issuer",
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                "tls_name_mismatch"
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "tls_expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "tls_not_yet_valid"
            }
            _ => "tls_bad_certificate",
        },
        Some(rustls::Error::AlertReceived(_)) => "tls_alert",
        Some(_) => "tls_handshake",
        None => match e.kind() {
            io::ErrorKind::UnexpectedEof => "tls_eof",
            io::ErrorKind::ConnectionReset => "tls_reset",
            _ => "tls_io",
        },
    }
}

/// Close-code-style name for how a WebSocket ended without a close frame.
pub const ABNORMAL: &str = "1006";

/// A close from the server as a failure: the close code is the error kind (1005 when the
/// frame had none, RFC 6455 7.4.1), the detail says "closed by server{when}: CODE REASON".
pub fn closed_by_server(
    frame: Option<tungstenite::protocol::CloseFrame>,
    when: &str,
) -> (String, String) {
    let (code, reason) = frame.map_or((1005, String::new()), |f| {
        (u16::from(f.code), f.reason.to_string())
    });
    (
        code.to_string(),
        format!("closed by server{when}: {code} {reason}"),
    )
}

/// Name of an error on an open WebSocket.
pub fn ws_stream_error_kind(e: &tungstenite::Error) -> String {
    match e {
        // The peer vanished without a close frame: what a browser reports as 1006.
        tungstenite::Error::Io(_)
        | tungstenite::Error::ConnectionClosed
        | tungstenite::Error::AlreadyClosed
        | tungstenite::Error::Protocol(
            tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
        ) => ABNORMAL.into(),
        tungstenite::Error::Protocol(_) => "ws_protocol".into(),
        tungstenite::Error::Capacity(_) => "ws_capacity".into(),
        tungstenite::Error::Utf8(_) => "ws_utf8".into(),
        _ => "ws_other".into(),
    }
}

/// Parses `--sources`: comma-separated addresses and IPv4 ranges (`127.0.0.1-127.0.0.16`),
/// in order, at most 65536 in all.
pub fn parse_sources(s: &str) -> Result<Vec<IpAddr>, String> {
    const MAX: usize = 65_536;
    let mut out = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let bad = |what: &str| format!("bad source address {item:?}: {what}");
        match item.split_once('-') {
            None => out.push(
                item.parse::<IpAddr>()
                    .map_err(|_| bad("not an IP address"))?,
            ),
            Some((a, b)) => {
                let parse = |v: &str| v.trim().parse::<std::net::Ipv4Addr>();
                let (Ok(a), Ok(b)) = (parse(a), parse(b)) else {
                    return Err(bad("a range is FIRST-LAST of IPv4 addresses"));
                };
                let (a, b) = (u32::from(a), u32::from(b));
                if a > b {
                    return Err(bad("the range ends before it starts"));
                }
                if (b - a) as usize >= MAX {
                    return Err(bad("range too large"));
                }
                out.extend((a..=b).map(|v| IpAddr::from(std::net::Ipv4Addr::from(v))));
            }
        }
        if out.len() > MAX {
            return Err(format!("more than {MAX} source addresses"));
        }
    }
    if out.is_empty() {
        return Err("no source address given".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse_lists_and_ranges() {
        let v = parse_sources("127.0.0.1-127.0.0.3, 10.0.0.9,::1").unwrap();
        let want: Vec<IpAddr> = ["127.0.0.1", "127.0.0.2", "127.0.0.3", "10.0.0.9", "::1"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(v, want);
        assert_eq!(parse_sources("127.0.0.1-127.0.1.0").unwrap().len(), 256);
        for bad in [
            "",
            "127.0.0.5-127.0.0.1",
            "localhost",
            "::1-::2",
            "1.0.0.0-2.0.0.0",
        ] {
            assert!(parse_sources(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tls_configs_build_without_a_default_provider() {
        assert!(client_config(&Tls::WebPkiRoots).is_ok());
        assert!(client_config(&Tls::Insecure).is_ok());
        let e = client_config(&Tls::CaFile("/nonexistent/ca.pem".into())).unwrap_err();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
    }

    #[test]
    fn tls_errors_are_named() {
        let unknown = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
        );
        assert_eq!(tls_error_kind(&unknown), "tls_unknown_issuer");
        let eof = io::Error::from(io::ErrorKind::UnexpectedEof);
        assert_eq!(tls_error_kind(&eof), "tls_eof");
        assert_eq!(DialError::Tls(unknown).kind(), "tls_unknown_issuer");
        let emfile = io::Error::from_raw_os_error(24);
        assert_eq!(ws_connect_error_kind(&emfile.into()), "emfile");
    }
}
