// An echo server on Cloudflare's tableflip (Go), used as its documentation intends, for the
// side-by-side upgrade bench (benches/peers/tableflip_echo.rs builds and starts it).
//
// The contract is the one every peer keeps (benches/peers/mod.rs): --listen ADDR, --pid-file
// PATH, --drain-timeout-ms N, --ready-timeout-ms N (tableflip's UpgradeTimeout); bytes read are
// written back until the client closes; SIGHUP upgrades to a new copy of os.Args[0] (tableflip
// re-executes it with the same arguments and hands it the listener); SIGTERM stops accepting,
// drains and exits 0. tableflip writes the pid file when the new process calls Ready.
package main

import (
	"flag"
	"io"
	"log"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/cloudflare/tableflip"
)

func main() {
	listen := flag.String("listen", "", "address to listen on")
	pidFile := flag.String("pid-file", "", "pid file, written once ready")
	drainMs := flag.Int("drain-timeout-ms", 60000, "how long live connections may finish")
	readyMs := flag.Int("ready-timeout-ms", 60000, "how long a new process may take to be ready")
	flag.Parse()
	log.SetPrefix("tableflip-echo ")
	if *listen == "" {
		log.Fatalln("--listen ADDR is needed")
	}

	upg, err := tableflip.New(tableflip.Options{
		PIDFile:        *pidFile,
		UpgradeTimeout: time.Duration(*readyMs) * time.Millisecond,
	})
	if err != nil {
		log.Fatalln("tableflip.New:", err)
	}
	defer upg.Stop()

	stop := make(chan struct{})
	go func() {
		sig := make(chan os.Signal, 2)
		signal.Notify(sig, syscall.SIGHUP, syscall.SIGTERM, syscall.SIGINT)
		for s := range sig {
			if s != syscall.SIGHUP {
				close(stop)
				return
			}
			// Upgrade blocks until the new process is ready or has failed; tableflip refuses
			// it while this process's own parent has not exited yet.
			if err := upg.Upgrade(); err != nil {
				log.Println("upgrade failed:", err)
			}
		}
	}()

	ln, err := upg.Fds.Listen("tcp", *listen)
	if err != nil {
		log.Fatalln("listen:", err)
	}

	var live sync.WaitGroup
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return // the listener was closed: we are done accepting
			}
			live.Add(1)
			go func() {
				defer live.Done()
				defer c.Close()
				io.Copy(c, c)
			}()
		}
	}()

	if err := upg.Ready(); err != nil {
		log.Fatalln("ready:", err)
	}
	select {
	case <-upg.Exit(): // a successor is ready and has the listener
	case <-stop:
	}
	// Stop accepting here; the successor (if any) holds its own copy of the socket, so the
	// connections still queued wait for it.
	ln.Close()

	drained := make(chan struct{})
	go func() {
		live.Wait()
		close(drained)
	}()
	select {
	case <-drained:
	case <-time.After(time.Duration(*drainMs) * time.Millisecond):
		log.Println("drain timeout: closing the connections still open")
	}
}
