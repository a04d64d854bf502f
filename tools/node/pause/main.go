// The node's pause image (the pod sandbox's first process): it holds the pod's namespaces and waits.
// registry.k8s.io/pause cannot be pulled here, so the run builds this one (standard library only, static).
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	<-stop
}
