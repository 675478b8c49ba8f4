//! A safetensors file written piece by piece: the header (every tensor's name, shape and
//! place) is known up front, so tensors too large for memory — per-example gradients of a
//! big model — can be written micro-batch by micro-batch as a session produces them.
//!
//! The file is written under a temporary name beside the target and renamed over it only by
//! [`StreamWriter::finish`], so a failed or interrupted run never leaves a partial file
//! under the output's name (nor replaces an older one). Before anything is written, the
//! free disk space is checked against the file's size.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

struct Slot {
    /// Byte offset of the tensor in the file.
    offset: u64,
    /// Elements of the tensor.
    len: u64,
    /// Elements per leading index (a row: one example of a `[B, ...]` tensor).
    row: u64,
}

/// An output file being written; see the module doc.
pub struct StreamWriter {
    path: PathBuf,
    tmp: PathBuf,
    file: Option<File>,
    slots: BTreeMap<String, Slot>,
}

/// Elements of a shape, or `None` on overflow.
fn elements(shape: &[usize]) -> Option<u64> {
    shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d as u64))
}

impl StreamWriter {
    /// Starts `path` with f32 tensors of these shapes (laid out in name order, as the
    /// safetensors crate does). Fails, before writing anything, if the disk lacks the room.
    pub fn create(path: &Path, shapes: &BTreeMap<String, Vec<usize>>) -> Result<StreamWriter> {
        let write_err = |source| Error::Write { path: path.to_path_buf(), source };
        let too_large = || Error::OutOfMemory {
            what: format!("the output file {}", path.display()),
            bytes: u64::MAX,
            budget: None,
            advice: "its size does not fit in 64 bits".into(),
        };
        let mut header = serde_json::Map::new();
        let mut slots = BTreeMap::new();
        let mut offset = 0u64;
        for (name, shape) in shapes {
            let len = elements(shape).ok_or_else(too_large)?;
            let bytes = len.checked_mul(4).ok_or_else(too_large)?;
            let end = offset.checked_add(bytes).ok_or_else(too_large)?;
            header.insert(
                name.clone(),
                serde_json::json!({ "dtype": "F32", "shape": shape, "data_offsets": [offset, end] }),
            );
            let row = if shape.is_empty() { 1 } else { elements(&shape[1..]).ok_or_else(too_large)? };
            slots.insert(name.clone(), Slot { offset, len, row });
            offset = end;
        }
        let mut json = serde_json::to_vec(&header).map_err(|e| Error::Internal(e.to_string()))?;
        // The data starts 8-byte aligned, as the safetensors crate writes it.
        while json.len() % 8 != 0 {
            json.push(b' ');
        }
        let data_start = 8 + json.len() as u64;
        let total = data_start.checked_add(offset).ok_or_else(too_large)?;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if let Ok(free) = fs4::available_space(&dir) {
            if free < total {
                return Err(Error::DiskFull {
                    path: path.to_path_buf(),
                    needed: total,
                    free,
                    advice: "write it to a larger disk, or ask for less: `--norms-only` (norms and losses), \
                             `--norms-only --clip C` (also the clipped sum), or a smaller batch"
                        .into(),
                });
            }
        }
        let name = path.file_name().map_or("output".into(), |n| n.to_string_lossy().into_owned());
        let tmp = dir.join(format!(".{name}.{}.partial", std::process::id()));
        let file = File::create(&tmp).map_err(|source| Error::Write { path: tmp.clone(), source })?;
        for slot in slots.values_mut() {
            slot.offset += data_start;
        }
        // From here on, dropping the writer removes the temporary file.
        let mut writer = StreamWriter { path: path.to_path_buf(), tmp, file: Some(file), slots };
        let f = writer.file.as_mut().expect("just set");
        f.set_len(total).map_err(write_err)?;
        f.write_all(&(json.len() as u64).to_le_bytes()).map_err(write_err)?;
        f.write_all(&json).map_err(write_err)?;
        Ok(writer)
    }

    /// Writes `data` into tensor `name` from leading index `first_row` on.
    pub fn write_rows(&mut self, name: &str, first_row: usize, data: &[f32]) -> Result<()> {
        let slot = self
            .slots
            .get(name)
            .ok_or_else(|| Error::Internal(format!("{}: no tensor `{name}` was declared", self.path.display())))?;
        let start = first_row as u64 * slot.row;
        if start + data.len() as u64 > slot.len {
            return Err(Error::Internal(format!(
                "{}: rows {first_row}.. of `{name}` ({} values) overrun its {} values",
                self.path.display(),
                data.len(),
                slot.len
            )));
        }
        let offset = slot.offset + start * 4;
        let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        let file = self.file.as_mut().ok_or_else(|| Error::Internal("write after finish".into()))?;
        let err = |source| Error::Write { path: self.tmp.clone(), source };
        file.seek(SeekFrom::Start(offset)).map_err(err)?;
        file.write_all(&bytes).map_err(err)
    }

    /// Writes the whole tensor `name`.
    pub fn write(&mut self, name: &str, data: &[f32]) -> Result<()> {
        self.write_rows(name, 0, data)
    }

    /// Flushes the file to disk and moves it to its name.
    pub fn finish(mut self) -> Result<()> {
        let file = self.file.take().ok_or_else(|| Error::Internal("finished twice".into()))?;
        file.sync_all().map_err(|source| Error::Write { path: self.tmp.clone(), source })?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path).map_err(|source| Error::Write { path: self.path.clone(), source })
    }
}

impl Drop for StreamWriter {
    /// An unfinished file is removed.
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Written in pieces, in any order, the file reads back with the safetensors crate.
    #[test]
    fn a_streamed_file_is_a_valid_safetensors_file() {
        let dir = std::env::temp_dir().join(format!("pdgc-stream-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("out.safetensors");
        let shapes: BTreeMap<String, Vec<usize>> =
            [("b".to_string(), vec![3, 2]), ("a".to_string(), vec![]), ("c".to_string(), vec![3])].into();
        let mut w = StreamWriter::create(&path, &shapes).unwrap();
        w.write_rows("b", 2, &[5.0, 6.0]).unwrap();
        w.write_rows("b", 0, &[1.0, 2.0, 3.0, 4.0]).unwrap();
        w.write("a", &[7.0]).unwrap();
        w.write("c", &[8.0, 9.0, 10.0]).unwrap();
        assert!(w.write_rows("c", 2, &[1.0, 2.0]).is_err(), "an overrun is an error");
        assert!(!path.exists(), "nothing is under the output's name before finish");
        w.finish().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let read = |n: &str| -> (Vec<usize>, Vec<f32>) {
            let t = st.tensor(n).unwrap();
            (t.shape().to_vec(), t.data().chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())
        };
        assert_eq!(read("b"), (vec![3, 2], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]));
        assert_eq!(read("a"), (vec![], vec![7.0]));
        assert_eq!(read("c"), (vec![3], vec![8.0, 9.0, 10.0]));
        let leftovers = std::fs::read_dir(&dir).unwrap().count();
        assert_eq!(leftovers, 1, "the temporary file was renamed, not copied");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_unfinished_file_leaves_nothing_behind() {
        let dir = std::env::temp_dir().join(format!("pdgc-stream-drop-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("out.safetensors");
        let shapes: BTreeMap<String, Vec<usize>> = [("x".to_string(), vec![4])].into();
        drop(StreamWriter::create(&path, &shapes).unwrap());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_larger_than_the_disk_is_refused_before_writing() {
        let dir = std::env::temp_dir().join(format!("pdgc-stream-big-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("out.safetensors");
        let shapes: BTreeMap<String, Vec<usize>> = [("g".to_string(), vec![1 << 20, 1 << 20, 1 << 10])].into();
        let e = StreamWriter::create(&path, &shapes).err().expect("4 PiB do not fit");
        assert!(matches!(e, Error::DiskFull { .. }), "{e}");
        assert!(e.to_string().contains("--norms-only"), "{e}");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
