// Offline build of this module against Debian's Go sources (golang-github-vmihailenco-msgpack.v5-dev), for
// machines without the module proxy. Use: GOFLAGS=-modfile=go.offline.mod GOPROXY=off go test -race ./...
// go.mod stays what a real user needs.
module github.com/lmport/lmport/clients/go

go 1.19

require github.com/vmihailenco/msgpack/v5 v5.3.5

require github.com/vmihailenco/tagparser/v2 v2.0.0 // indirect

replace (
	github.com/stretchr/testify => ./offline/testify
	github.com/vmihailenco/msgpack/v5 => /usr/share/gocode/src/github.com/vmihailenco/msgpack/v5
	github.com/vmihailenco/tagparser/v2 => /usr/share/gocode/src/github.com/vmihailenco/tagparser/v2
)
