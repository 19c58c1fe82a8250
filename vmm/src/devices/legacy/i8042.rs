//! A minimal i8042 keyboard controller: enough for Linux to probe it and to
//! reboot through it (`reboot=k` writes the CPU-reset command 0xFE to port
//! 0x64), which the VMM turns into a clean exit.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::devices::bus::BusDevice;

/// Offset of the data port (0x60) in the device's range.
pub const DATA_OFFSET: u64 = 0;
/// Offset of the command/status port (0x64) in the device's range.
pub const COMMAND_OFFSET: u64 = 4;

const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
const STATUS_LAST_WAS_COMMAND: u8 = 0x08;
const STATUS_AUX_DATA: u8 = 0x20;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_TEST_AUX: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_TEST_KBD: u8 = 0xab;
const CMD_DISABLE_KBD: u8 = 0xad;
const CMD_ENABLE_KBD: u8 = 0xae;
const CMD_READ_OUTP: u8 = 0xd0;
const CMD_WRITE_OUTP: u8 = 0xd1;
const CMD_WRITE_KBD_OUTBUF: u8 = 0xd2;
const CMD_WRITE_AUX_OUTBUF: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_RESET_CPU: u8 = 0xfe;

const KBD_ACK: u8 = 0xfa;
const KBD_RESET: u8 = 0xff;
const KBD_SELF_TEST_OK: u8 = 0xaa;
const SELF_TEST_OK: u8 = 0x55;
/// Enough for any command's reply; older bytes are dropped beyond it.
const BUFFER_CAP: usize = 16;

/// Saved controller state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    status: u8,
    control: u8,
    output_port: u8,
    pending: Option<u8>,
    buffer: Vec<(u8, bool)>,
}

/// The controller; `on_reset` runs when the guest asks for a CPU reset.
pub struct I8042 {
    status: u8,
    control: u8,
    output_port: u8,
    pending: Option<u8>,
    buffer: VecDeque<(u8, bool)>,
    on_reset: Box<dyn FnMut() + Send>,
}

impl I8042 {
    /// A controller that calls `on_reset` on a reset request.
    pub fn new(on_reset: Box<dyn FnMut() + Send>) -> Self {
        Self {
            status: STATUS_SYSTEM_FLAG,
            control: 0x47,
            output_port: 0x01,
            pending: None,
            buffer: VecDeque::new(),
            on_reset,
        }
    }

    /// The controller's registers and output buffer.
    pub fn save(&self) -> I8042State {
        I8042State {
            status: self.status,
            control: self.control,
            output_port: self.output_port,
            pending: self.pending,
            buffer: self.buffer.iter().copied().collect(),
        }
    }

    /// A controller in `state` (an oversized buffer is cut to capacity).
    pub fn restore(state: &I8042State, on_reset: Box<dyn FnMut() + Send>) -> Self {
        let mut d = Self::new(on_reset);
        d.status = state.status;
        d.control = state.control;
        d.output_port = state.output_port;
        d.pending = state.pending;
        d.buffer = state.buffer.iter().take(BUFFER_CAP).copied().collect();
        d.update_status();
        d
    }

    fn push(&mut self, byte: u8, aux: bool) {
        if self.buffer.len() == BUFFER_CAP {
            self.buffer.pop_front();
        }
        self.buffer.push_back((byte, aux));
        self.update_status();
    }

    fn update_status(&mut self) {
        self.status &= !(STATUS_OUTPUT_FULL | STATUS_AUX_DATA);
        if let Some(&(_, aux)) = self.buffer.front() {
            self.status |= STATUS_OUTPUT_FULL;
            if aux {
                self.status |= STATUS_AUX_DATA;
            }
        }
    }

    fn command(&mut self, cmd: u8) {
        self.status |= STATUS_LAST_WAS_COMMAND;
        match cmd {
            CMD_READ_CTR => self.push(self.control, false),
            CMD_READ_OUTP => self.push(self.output_port, false),
            CMD_SELF_TEST => self.push(SELF_TEST_OK, false),
            CMD_TEST_KBD | CMD_TEST_AUX => self.push(0x00, false),
            CMD_WRITE_CTR | CMD_WRITE_OUTP | CMD_WRITE_KBD_OUTBUF | CMD_WRITE_AUX_OUTBUF
            | CMD_WRITE_AUX => self.pending = Some(cmd),
            CMD_DISABLE_AUX => self.control |= 0x20,
            CMD_ENABLE_AUX => self.control &= !0x20,
            CMD_DISABLE_KBD => self.control |= 0x10,
            CMD_ENABLE_KBD => self.control &= !0x10,
            CMD_RESET_CPU => (self.on_reset)(),
            _ => {}
        }
    }

    fn data(&mut self, byte: u8) {
        self.status &= !STATUS_LAST_WAS_COMMAND;
        match self.pending.take() {
            Some(CMD_WRITE_CTR) => self.control = byte,
            Some(CMD_WRITE_OUTP) => {
                self.output_port = byte;
                // Bit 0 low is the old way to pulse the CPU reset line.
                if byte & 1 == 0 {
                    (self.on_reset)();
                }
            }
            Some(CMD_WRITE_KBD_OUTBUF) => self.push(byte, false),
            Some(CMD_WRITE_AUX_OUTBUF) => self.push(byte, true),
            // No mouse: a command for it gets the "no device" answer.
            Some(_) => self.push(0xfe, true),
            None if byte == KBD_RESET => {
                self.push(KBD_ACK, false);
                self.push(KBD_SELF_TEST_OK, false);
            }
            None => self.push(KBD_ACK, false),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            DATA_OFFSET => {
                let v = self.buffer.pop_front().map_or(0, |(b, _)| b);
                self.update_status();
                v
            }
            COMMAND_OFFSET => self.status,
            _ => 0xff,
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&byte) = data.first() else { return };
        match offset {
            DATA_OFFSET => self.data(byte),
            COMMAND_OFFSET => self.command(byte),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn device() -> (I8042, Arc<AtomicUsize>) {
        let resets = Arc::new(AtomicUsize::new(0));
        let r = resets.clone();
        (
            I8042::new(Box::new(move || {
                r.fetch_add(1, Ordering::SeqCst);
            })),
            resets,
        )
    }

    fn read(d: &mut I8042, offset: u64) -> u8 {
        let mut b = [0u8];
        d.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_calls_back() {
        let (mut d, resets) = device();
        assert_eq!(
            read(&mut d, COMMAND_OFFSET) & 0x02,
            0,
            "input buffer never full"
        );
        d.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(resets.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn control_register_round_trips() {
        let (mut d, _) = device();
        d.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        d.write(DATA_OFFSET, &[0x65]);
        d.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        assert_eq!(read(&mut d, COMMAND_OFFSET) & STATUS_OUTPUT_FULL, 1);
        assert_eq!(read(&mut d, DATA_OFFSET), 0x65);
        assert_eq!(read(&mut d, COMMAND_OFFSET) & STATUS_OUTPUT_FULL, 0);
    }

    #[test]
    fn self_test_and_keyboard_reset_answer() {
        let (mut d, _) = device();
        d.write(COMMAND_OFFSET, &[CMD_SELF_TEST]);
        assert_eq!(read(&mut d, DATA_OFFSET), SELF_TEST_OK);
        d.write(DATA_OFFSET, &[KBD_RESET]);
        assert_eq!(read(&mut d, DATA_OFFSET), KBD_ACK);
        assert_eq!(read(&mut d, DATA_OFFSET), KBD_SELF_TEST_OK);
    }

    #[test]
    fn output_buffer_is_bounded() {
        let (mut d, _) = device();
        for _ in 0..1000 {
            d.write(DATA_OFFSET, &[0x01]);
        }
        let mut n = 0;
        while read(&mut d, COMMAND_OFFSET) & STATUS_OUTPUT_FULL != 0 {
            read(&mut d, DATA_OFFSET);
            n += 1;
        }
        assert_eq!(n, BUFFER_CAP);
    }

    #[test]
    fn state_round_trips() {
        let (mut d, _) = device();
        d.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        d.write(DATA_OFFSET, &[0x61]);
        d.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        let state = d.save();
        let (_, resets) = device();
        let r = resets.clone();
        let mut back = I8042::restore(
            &state,
            Box::new(move || {
                r.fetch_add(1, Ordering::SeqCst);
            }),
        );
        assert_eq!(back.save(), state);
        assert_eq!(read(&mut back, DATA_OFFSET), 0x61);
    }

    #[test]
    fn pulsing_reset_line_through_output_port() {
        let (mut d, resets) = device();
        d.write(COMMAND_OFFSET, &[CMD_WRITE_OUTP]);
        d.write(DATA_OFFSET, &[0xfe]);
        assert_eq!(resets.load(Ordering::SeqCst), 1);
        d.write(DATA_OFFSET, &[]);
        d.write(99, &[1]);
    }
}
