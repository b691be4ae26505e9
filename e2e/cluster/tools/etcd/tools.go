//go:build tools

// Package tools pins the etcd server e2e/cluster/build compiles.
package tools

import _ "go.etcd.io/etcd/server/v3"
