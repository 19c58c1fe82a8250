//! COM1: a 16550A UART (vm-superio) whose interrupt is an irqfd.

use std::io::{self, Write};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;

/// Raises the UART's interrupt line by writing to an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// The guest's serial console.
pub struct SerialConsole {
    uart: Serial<IrqTrigger, NoEvents, Box<dyn Write + Send>>,
}

impl SerialConsole {
    /// A UART that signals `irq` and writes what the guest sends to `out`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: Serial::new(IrqTrigger(irq), out),
        }
    }

    /// Queues bytes for the guest to read (console input).
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// Room left in the receive FIFO.
    pub fn input_room(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// The UART registers and receive FIFO.
    pub fn save(&self) -> SerialConsoleState {
        let s = self.uart.state();
        SerialConsoleState {
            registers: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer,
        }
    }

    /// A UART in `state`, signalling `irq` and writing to `out`.
    pub fn restore(
        state: &SerialConsoleState,
        irq: EventFd,
        out: Box<dyn Write + Send>,
    ) -> Result<Self, Error> {
        let [baud_divisor_low, baud_divisor_high, interrupt_enable, interrupt_identification, line_control, line_status, modem_control, modem_status, scratch] =
            state.registers;
        let s = SerialState {
            baud_divisor_low,
            baud_divisor_high,
            interrupt_enable,
            interrupt_identification,
            line_control,
            line_status,
            modem_control,
            modem_status,
            scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let uart =
            Serial::from_state(&s, IrqTrigger(irq), NoEvents, out).map_err(|_| Error::BadState)?;
        Ok(Self { uart })
    }
}

/// Saved UART state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialConsoleState {
    /// DLL, DLM, IER, IIR, LCR, LSR, MCR, MSR, SCR.
    pub registers: [u8; 9],
    /// Bytes received but not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

/// Errors of the serial console.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A saved state the UART cannot take (receive FIFO over capacity).
    #[error("saved serial state is invalid (receive FIFO too large)")]
    BadState,
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(off), [byte]) => *byte = self.uart.read(off),
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [byte]) = (u8::try_from(offset), data) {
            if let Err(e) = self.uart.write(off, *byte) {
                // The console sink failing (a closed pipe) must not stop the guest.
                tracing::debug!("serial write failed: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().expect("unpoisoned").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn guest_output_reaches_the_sink_and_raises_irq() {
        let sink = Sink::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let mut s = SerialConsole::new(irq.try_clone().expect("dup"), Box::new(sink.clone()));
        // Enable the THR-empty interrupt, then send two bytes.
        s.write(1, &[0x02]);
        for b in b"hi" {
            s.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().expect("unpoisoned"), b"hi");
        assert!(irq.read().expect("interrupt raised") >= 1);
    }

    #[test]
    fn input_is_readable_by_guest() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let mut s = SerialConsole::new(irq, Box::new(io::sink()));
        assert_eq!(s.enqueue_input(b"x"), 1);
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut b = [0u8];
        s.read(0, &mut b);
        assert_eq!(b[0], b'x');
    }

    #[test]
    fn state_round_trips_and_bad_state_is_refused() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let mut s = SerialConsole::new(irq.try_clone().expect("dup"), Box::new(io::sink()));
        s.write(3, &[0x03]);
        s.write(7, &[0x5a]);
        s.enqueue_input(b"abc");
        let state = s.save();
        let mut r =
            SerialConsole::restore(&state, irq.try_clone().expect("dup"), Box::new(io::sink()))
                .expect("valid state");
        assert_eq!(r.save(), state);
        let mut b = [0u8];
        r.read(0, &mut b);
        assert_eq!(b[0], b'a');
        let mut bad = state;
        bad.in_buffer = vec![0; 1 << 20];
        assert!(SerialConsole::restore(&bad, irq, Box::new(io::sink())).is_err());
    }

    #[test]
    fn wide_or_out_of_range_accesses_are_ignored() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let mut s = SerialConsole::new(irq, Box::new(io::sink()));
        let mut two = [0u8; 2];
        s.read(0, &mut two);
        assert_eq!(two, [0xff, 0xff]);
        s.write(0x1000, &[1]);
        s.write(0, &[1, 2]);
    }
}
