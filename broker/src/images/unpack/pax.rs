//! PAX extended-header records (`"<len> <key>=<value>\n"`), parsed by their
//! length prefix, so binary values (an xattr holding a newline byte, as
//! `security.capability` may) are read whole.

/// One record: its key and its value.
pub(super) type Record<'a> = (&'a [u8], &'a [u8]);

/// The records of one PAX header, in order; the error says what is malformed.
pub(super) fn records(mut data: &[u8]) -> Result<Vec<Record<'_>>, String> {
    let mut out = Vec::new();
    while !data.iter().all(|b| *b == 0) {
        let space = data
            .iter()
            .take(21)
            .position(|b| *b == b' ')
            .ok_or("a PAX record does not start with its length")?;
        let digits = &data[..space];
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return Err("a PAX record's length is not a decimal number".into());
        }
        let len: usize = std::str::from_utf8(digits)
            .ok()
            .and_then(|d| d.parse().ok())
            .ok_or("a PAX record's length is out of range")?;
        if len <= space + 1 || len > data.len() {
            return Err(format!(
                "a PAX record claims {len} bytes but {} remain",
                data.len()
            ));
        }
        let record = &data[space + 1..len];
        let Some((b'\n', record)) = record.split_last() else {
            return Err("a PAX record does not end with a newline".into());
        };
        let equals = record
            .iter()
            .position(|b| *b == b'=')
            .ok_or("a PAX record has no `=`")?;
        if equals == 0 {
            return Err("a PAX record has an empty key".into());
        }
        out.push((&record[..equals], &record[equals + 1..]));
        data = &data[len..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_binary_values_by_length() {
        let value = b"a\nb=c";
        let body = [&b"SCHILY.xattr.user.x="[..], value, b"\n"].concat();
        let len = body.len() + 3; // "NN " + body
        let data = [
            format!("{len} ").into_bytes(),
            body,
            b"11 path=ab\n".to_vec(),
        ]
        .concat();
        let recs = records(&data).expect("valid");
        assert_eq!(recs[0], (&b"SCHILY.xattr.user.x"[..], &value[..]));
        assert_eq!(recs[1], (&b"path"[..], &b"ab"[..]));
    }

    #[test]
    fn refuses_malformed_records() {
        for bad in [
            &b"5 a=b\n"[..],
            b"x a=b\n",
            b"99999999999999999999999 a=b\n",
            b"7 a=bc!",
            b"6 abc\n",
            b"5 =b\n",
            b"nospace",
        ] {
            assert!(records(bad).is_err(), "{bad:?}");
        }
        assert!(records(b"").expect("empty").is_empty());
    }
}
