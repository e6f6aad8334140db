//! Reading Redis replies: the scripts' `{offset, epoch, …}` heads, stream entries and
//! plain values, each malformed reply a typed error rather than a panic.

use crate::broker::{BrokerError, Position, tracker::StreamPage};
use broker_proto::v1::{Publication, ServerFrame, server_frame::Body};
use bytes::Bytes;
use prost::Message as _;
use redis::Value;

pub fn bulk(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

pub fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        other => std::str::from_utf8(bulk(other)?).ok()?.parse().ok(),
    }
}

pub fn text(v: &Value) -> String {
    bulk(v)
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_default()
}

pub fn bad_reply(what: &str) -> BrokerError {
    BrokerError::Internal(format!("unexpected redis reply to {what}"))
}

/// The `{offset, epoch, …}` head that the publish and history scripts both return.
pub fn position(reply: &[Value], what: &str) -> Result<Position, BrokerError> {
    let offset = reply.first().and_then(int).ok_or_else(|| bad_reply(what))?;
    let epoch = reply.get(1).map(text).ok_or_else(|| bad_reply(what))?;
    Ok(Position {
        offset: u64::try_from(offset).map_err(|_| bad_reply(what))?,
        epoch,
    })
}

/// The history script's reply: `{offset, epoch, id1, data1, id2, data2, …}`. Entries carry
/// the stored publication without offset and epoch; they are filled in from the entry id
/// and the head. `count` is what was asked for, to tell whether the read was cut short.
pub fn stream_page(reply: &[Value], count: usize) -> Result<StreamPage, BrokerError> {
    let Position { offset, epoch } = position(reply, "history")?;
    let mut publications = Vec::new();
    for pair in reply[2..].chunks(2) {
        let [id, data] = pair else {
            return Err(bad_reply("history"));
        };
        let entry_offset: u64 = text(id)
            .split('-')
            .next()
            .and_then(|o| o.parse().ok())
            .ok_or_else(|| bad_reply("history id"))?;
        let bytes = Bytes::copy_from_slice(bulk(data).unwrap_or_default());
        let frame = ServerFrame::decode(bytes).map_err(|_| bad_reply("history entry"))?;
        if let Some(Body::Publication(mut p)) = frame.body {
            p.offset = entry_offset;
            p.epoch = epoch.clone();
            publications.push(p);
        }
    }
    let truncated = count > 0 && publications.len() >= count;
    Ok(StreamPage {
        epoch,
        offset,
        publications,
        truncated,
    })
}

/// Splits a pub/sub message "<offset> <epoch> <payload>".
pub fn envelope(message: &[u8]) -> Option<(u64, &str, &[u8])> {
    let space = message.iter().position(|&b| b == b' ')?;
    let offset = std::str::from_utf8(&message[..space]).ok()?.parse().ok()?;
    let rest = &message[space + 1..];
    let space = rest.iter().position(|&b| b == b' ')?;
    let epoch = std::str::from_utf8(&rest[..space]).ok()?;
    Some((offset, epoch, &rest[space + 1..]))
}

/// A publication from a pub/sub message, or another push (Join/Leave) to fan out as is.
#[derive(Debug)]
pub enum Message {
    Publication(Publication),
    Push(Body),
}

/// What one pub/sub message carries: one publication or push ("<offset> <epoch> <frame>"),
/// or several publications of one channel from one batch ("m <epoch> <first offset>
/// <len1>,<len2>,… <frame1><frame2>…": consecutive offsets from the first, all 0 for a
/// channel without history; see `scripts::publish`).
pub fn messages(payload: &[u8]) -> Result<Vec<Message>, &'static str> {
    const BAD: &str = "undecodable pub/sub envelope";
    let Some(batch) = payload.strip_prefix(b"m ") else {
        let (offset, epoch, body) = envelope(payload).ok_or(BAD)?;
        return Ok(vec![message(offset, epoch, body)?]);
    };
    let (first, epoch, rest) = envelope_after_epoch(batch).ok_or(BAD)?;
    let space = rest.iter().position(|&b| b == b' ').ok_or(BAD)?;
    let lens = std::str::from_utf8(&rest[..space]).map_err(|_| BAD)?;
    let mut bodies = &rest[space + 1..];
    let mut out = Vec::new();
    for (i, len) in lens.split(',').enumerate() {
        let len: usize = len.parse().map_err(|_| BAD)?;
        if len > bodies.len() {
            return Err(BAD);
        }
        let (body, tail) = bodies.split_at(len);
        bodies = tail;
        let offset = if first == 0 { 0 } else { first + i as u64 };
        match message(offset, epoch, body)? {
            p @ Message::Publication(_) => out.push(p),
            Message::Push(_) => return Err("a push inside a batch"),
        }
    }
    if !bodies.is_empty() {
        return Err(BAD);
    }
    Ok(out)
}

/// "<epoch> <first offset> <rest>" (the batch form's head after "m ").
fn envelope_after_epoch(message: &[u8]) -> Option<(u64, &str, &[u8])> {
    let space = message.iter().position(|&b| b == b' ')?;
    let epoch = std::str::from_utf8(&message[..space]).ok()?;
    let rest = &message[space + 1..];
    let space = rest.iter().position(|&b| b == b' ')?;
    let first = std::str::from_utf8(&rest[..space]).ok()?.parse().ok()?;
    Some((first, epoch, &rest[space + 1..]))
}

fn message(offset: u64, epoch: &str, body: &[u8]) -> Result<Message, &'static str> {
    let frame = ServerFrame::decode(Bytes::copy_from_slice(body))
        .map_err(|_| "undecodable pub/sub frame")?;
    match frame.body {
        Some(Body::Publication(mut p)) => {
            p.offset = offset;
            p.epoch = epoch.to_owned();
            Ok(Message::Publication(p))
        }
        Some(body) => Ok(Message::Push(body)),
        None => Err("empty pub/sub frame"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_envelopes() {
        assert_eq!(
            envelope(b"12 abc payload bytes"),
            Some((12, "abc", &b"payload bytes"[..]))
        );
        assert_eq!(envelope(b"0  \x00\x01"), Some((0, "", &b"\x00\x01"[..])));
        assert_eq!(envelope(b"x y z"), None);
        assert_eq!(envelope(b"12"), None);
    }

    fn publication(data: &'static [u8]) -> Vec<u8> {
        ServerFrame {
            id: 0,
            error: None,
            body: Some(Body::Publication(Publication {
                channel: "c".into(),
                data: Bytes::from_static(data),
                ..Default::default()
            })),
        }
        .encode_to_vec()
    }

    fn offsets_and_data(m: &[Message]) -> Vec<(u64, String, Vec<u8>)> {
        m.iter()
            .map(|m| match m {
                Message::Publication(p) => (p.offset, p.epoch.clone(), p.data.to_vec()),
                Message::Push(b) => panic!("{b:?}"),
            })
            .collect()
    }

    #[test]
    fn parses_one_publication_and_a_batch() {
        let mut one = b"7 ep ".to_vec();
        one.extend(publication(b"x"));
        let got = offsets_and_data(&messages(&one).unwrap());
        assert_eq!(got, [(7, "ep".into(), b"x".to_vec())]);

        let (a, b) = (publication(b"first"), publication(b""));
        let mut batch = format!("m ep 41 {},{} ", a.len(), b.len()).into_bytes();
        batch.extend(&a);
        batch.extend(&b);
        let got = offsets_and_data(&messages(&batch).unwrap());
        assert_eq!(
            got,
            [
                (41, "ep".into(), b"first".to_vec()),
                (42, "ep".into(), vec![])
            ]
        );

        // Without history: every offset 0, no epoch.
        let mut batch = format!("m  0 {},{} ", a.len(), a.len()).into_bytes();
        batch.extend(&a);
        batch.extend(&a);
        let got = offsets_and_data(&messages(&batch).unwrap());
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), [0, 0]);
        assert_eq!(got[0].1, "");
    }

    #[test]
    fn refuses_a_batch_whose_lengths_do_not_add_up() {
        let a = publication(b"abc");
        for lens in [
            format!("{}", a.len() + 1),
            format!("{},1", a.len()),
            format!("{}", a.len() - 1),
            "x".into(),
            String::new(),
        ] {
            let mut batch = format!("m ep 1 {lens} ").into_bytes();
            batch.extend(&a);
            assert!(messages(&batch).is_err(), "{lens}");
        }
        assert!(messages(b"m ep").is_err());
    }

    #[test]
    fn reads_a_stream_page_and_notices_a_short_count() {
        let entry = ServerFrame {
            id: 0,
            error: None,
            body: Some(Body::Publication(Publication {
                channel: "c".into(),
                data: Bytes::from_static(b"x"),
                ..Default::default()
            })),
        }
        .encode_to_vec();
        let reply = vec![
            Value::Int(7),
            Value::BulkString(b"ep".to_vec()),
            Value::BulkString(b"6-0".to_vec()),
            Value::BulkString(entry.clone()),
            Value::BulkString(b"7-0".to_vec()),
            Value::BulkString(entry),
        ];
        let page = stream_page(&reply, 2).unwrap();
        assert_eq!((page.offset, page.epoch.as_str()), (7, "ep"));
        let offsets: Vec<_> = page
            .publications
            .iter()
            .map(|p| (p.offset, p.epoch.as_str()))
            .collect();
        assert_eq!(offsets, vec![(6, "ep"), (7, "ep")]);
        assert!(page.truncated, "asked for 2, got 2: maybe more");
        assert!(!stream_page(&reply, 10).unwrap().truncated);
        assert!(stream_page(&reply[..3], 10).is_err());
        assert!(position(&[Value::Int(-1), Value::Nil], "x").is_err());
    }
}
