// Empty stand-in for testify, which msgpack's go.mod requires only for its own tests; the offline build
// (go.offline.mod) points here so no download is attempted.
module github.com/stretchr/testify

go 1.19
