//! Request checks done before a request is proposed, with etcd's errors (etcd's
//! `checkRangeRequest`, `checkPutRequest`, `checkTxnRequest` and `checkIntervals`).

use flotilla_proto::etcdserverpb::{
    request_op, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};

use crate::error::EtcdError;
use crate::mvcc::RangeEnd;

pub fn range(r: &RangeRequest) -> Result<(), EtcdError> {
    if r.key.is_empty() {
        return Err(EtcdError::EmptyKey);
    }
    Ok(())
}

pub fn put(r: &PutRequest) -> Result<(), EtcdError> {
    if r.key.is_empty() {
        return Err(EtcdError::EmptyKey);
    }
    if r.ignore_value && !r.value.is_empty() {
        return Err(EtcdError::ValueProvided);
    }
    if r.ignore_lease && r.lease != 0 {
        return Err(EtcdError::LeaseProvided);
    }
    Ok(())
}

pub fn delete_range(r: &DeleteRangeRequest) -> Result<(), EtcdError> {
    if r.key.is_empty() {
        return Err(EtcdError::EmptyKey);
    }
    Ok(())
}

pub fn txn(r: &TxnRequest, max_ops: usize) -> Result<(), EtcdError> {
    if r.compare.len() > max_ops || r.success.len() > max_ops || r.failure.len() > max_ops {
        return Err(EtcdError::TooManyOps);
    }
    for c in &r.compare {
        if c.key.is_empty() {
            return Err(EtcdError::EmptyKey);
        }
    }
    for op in r.success.iter().chain(&r.failure) {
        match &op.request {
            Some(request_op::Request::RequestRange(x)) => range(x)?,
            Some(request_op::Request::RequestPut(x)) => put(x)?,
            Some(request_op::Request::RequestDeleteRange(x)) => delete_range(x)?,
            Some(request_op::Request::RequestTxn(x)) => txn(x, max_ops)?,
            None => {}
        }
    }
    branch_writes(&r.success)?;
    branch_writes(&r.failure)?;
    Ok(())
}

/// Keys a branch writes: single-key puts and deleted ranges.
#[derive(Default)]
struct Writes {
    puts: Vec<Vec<u8>>,
    deletes: Vec<(Vec<u8>, Vec<u8>)>,
}

fn overlaps_delete(deletes: &[(Vec<u8>, Vec<u8>)], key: &[u8]) -> bool {
    deletes
        .iter()
        .any(|(k, end)| RangeEnd::of(end).contains(k, key))
}

/// A key may be written once per branch: two puts, or a put inside a deleted range, are
/// refused with `duplicate key`. A nested Txn counts with both its branches, as in etcd.
fn branch_writes(ops: &[RequestOp]) -> Result<Writes, EtcdError> {
    let mut w = Writes::default();
    for op in ops {
        match &op.request {
            Some(request_op::Request::RequestDeleteRange(d)) => {
                w.deletes.push((d.key.clone(), d.range_end.clone()))
            }
            Some(request_op::Request::RequestTxn(t)) => {
                let success = branch_writes(&t.success)?;
                let failure = branch_writes(&t.failure)?;
                for p in success.puts.into_iter().chain(failure.puts) {
                    if w.puts.contains(&p) {
                        return Err(EtcdError::DuplicateKey);
                    }
                    w.puts.push(p);
                }
                w.deletes
                    .extend(success.deletes.into_iter().chain(failure.deletes));
            }
            _ => {}
        }
    }
    for op in ops {
        if let Some(request_op::Request::RequestPut(p)) = &op.request {
            if w.puts.contains(&p.key) || overlaps_delete(&w.deletes, &p.key) {
                return Err(EtcdError::DuplicateKey);
            }
            w.puts.push(p.key.clone());
        }
    }
    for p in &w.puts {
        if overlaps_delete(&w.deletes, p) {
            return Err(EtcdError::DuplicateKey);
        }
    }
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::etcdserverpb::request_op::Request;

    fn put_op(key: &str) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestPut(PutRequest {
                key: key.into(),
                value: b"v".to_vec(),
                ..Default::default()
            })),
        }
    }
    fn del_op(key: &str, end: &str) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
                key: key.into(),
                range_end: end.into(),
                ..Default::default()
            })),
        }
    }
    fn txn_of(success: Vec<RequestOp>) -> TxnRequest {
        TxnRequest {
            success,
            ..Default::default()
        }
    }

    #[test]
    fn txn_write_conflicts_are_duplicate_keys() {
        let cases: Vec<(&str, Vec<RequestOp>, Result<(), EtcdError>)> = vec![
            ("distinct puts", vec![put_op("a"), put_op("b")], Ok(())),
            (
                "same key twice",
                vec![put_op("a"), put_op("a")],
                Err(EtcdError::DuplicateKey),
            ),
            (
                "put inside deleted range",
                vec![del_op("a", "c"), put_op("b")],
                Err(EtcdError::DuplicateKey),
            ),
            (
                "put outside deleted range",
                vec![del_op("a", "c"), put_op("c")],
                Ok(()),
            ),
            (
                "deletes may overlap",
                vec![del_op("a", "c"), del_op("b", "d")],
                Ok(()),
            ),
            (
                "nested put clashes with outer put",
                vec![
                    put_op("a"),
                    RequestOp {
                        request: Some(Request::RequestTxn(txn_of(vec![put_op("a")]))),
                    },
                ],
                Err(EtcdError::DuplicateKey),
            ),
        ];
        for (name, ops, want) in cases {
            assert_eq!(txn(&txn_of(ops), 128), want, "{name}");
        }
    }

    #[test]
    fn txn_op_count_is_limited() {
        let ops: Vec<RequestOp> = (0..129).map(|i| put_op(&format!("k{i}"))).collect();
        assert_eq!(txn(&txn_of(ops.clone()), 128), Err(EtcdError::TooManyOps));
        assert_eq!(txn(&txn_of(ops[..128].to_vec()), 128), Ok(()));
    }

    #[test]
    fn put_flags_are_checked() {
        let p = PutRequest {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            ignore_value: true,
            ..Default::default()
        };
        assert_eq!(put(&p), Err(EtcdError::ValueProvided));
        let p = PutRequest {
            key: b"k".to_vec(),
            lease: 5,
            ignore_lease: true,
            ..Default::default()
        };
        assert_eq!(put(&p), Err(EtcdError::LeaseProvided));
        assert_eq!(put(&PutRequest::default()), Err(EtcdError::EmptyKey));
    }
}
