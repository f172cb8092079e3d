// Command run-goal runs a goal on a Trellis executor and prints its events as they stream.
//
// The stubs are generated from Trellis' protos/ into ./gen of this module (see
// docs/clients.md): with go_package prefix example.com/trellisclient/gen, the executor's
// package is example.com/trellisclient/gen/trellis/executor/v1 (package executorv1).
//
//	go run . [-target localhost:50051] [-tenant acme] [-timeout 5m] "What is (17*23)+4?"
//
// Exit status: 0 the run SUCCEEDED, 1 it finished otherwise, 3 the call failed.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	executorv1 "example.com/trellisclient/gen/trellis/executor/v1"
)

func main() {
	target := flag.String("target", "localhost:50051", "the executor's host:port")
	tenant := flag.String("tenant", "", "act for this tenant (x-tenant-id metadata; only where auth is off)")
	timeout := flag.Duration("timeout", 5*time.Minute, "deadline of the whole run")
	flag.Parse()
	goal := "What is (17*23)+4?"
	if flag.NArg() > 0 {
		goal = flag.Arg(0)
	}
	os.Exit(run(*target, *tenant, *timeout, goal))
}

func run(target, tenant string, timeout time.Duration, goal string) int {
	// NewClient connects lazily, on the first call. Plaintext, as the stack serves it.
	conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		fmt.Fprintln(os.Stderr, "client:", err)
		return 3
	}
	defer conn.Close()
	client := executorv1.NewExecutorServiceClient(conn)

	// Every call carries a deadline; the stack passes what is left of it to each hop.
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	// The API key decides the tenant when the executor's auth is on (the default).
	if key := os.Getenv("TRELLIS_API_KEY"); key != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+key)
	}
	if tenant != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "x-tenant-id", tenant)
	}

	stream, err := client.Run(ctx, &executorv1.RunRequest{Goal: goal})
	if err != nil {
		return report(err)
	}
	for {
		resp, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			fmt.Fprintln(os.Stderr, "the stream ended without a finished event")
			return 1
		}
		if err != nil {
			return report(err)
		}
		switch ev := resp.GetEvent().(type) {
		case *executorv1.RunResponse_Started:
			fmt.Printf("run %s started, trace_id %s\n", resp.GetRunId(), ev.Started.GetTraceId())
		case *executorv1.RunResponse_NodePlanned:
			call := ev.NodePlanned.GetCall()
			fmt.Printf("planned  %s %s %v after %v\n",
				call.GetNodeId(), call.GetTool(), call.GetArgs().AsMap(), call.GetDependsOn())
		case *executorv1.RunResponse_NodeStarted:
			fmt.Printf("started  %s (attempt %d)\n", ev.NodeStarted.GetNodeId(), ev.NodeStarted.GetAttempt())
		case *executorv1.RunResponse_NodeFinished:
			o := ev.NodeFinished.GetOutcome()
			took := o.GetFinishedAt().AsTime().Sub(o.GetStartedAt().AsTime())
			fmt.Printf("finished %s %s in %v (cache hit: %t) %v\n",
				o.GetNodeId(), o.GetStatus(), took, o.GetCacheHit(), o.GetOutput().AsInterface())
		case *executorv1.RunResponse_AnswerDelta:
			fmt.Print(ev.AnswerDelta.GetText())
		case *executorv1.RunResponse_Finished:
			f := ev.Finished
			fmt.Printf("\nstatus: %s\ntokens: %d in / %d out\ncost: %d nano-USD\ncache hits: %d\nduration: %v\n",
				f.GetStatus(), f.GetUsage().GetInputTokens(), f.GetUsage().GetOutputTokens(),
				f.GetCostNanoUsd(), f.GetCacheHits(), f.GetDuration().AsDuration())
			if f.GetStatus() != executorv1.RunStatus_RUN_STATUS_SUCCEEDED {
				fmt.Fprintf(os.Stderr, "error: %s: %s\n", f.GetError().GetCode(), f.GetError().GetMessage())
				return 1
			}
			return 0
		}
	}
}

// report prints a gRPC error: its code, message and the google.rpc details Trellis sends
// (ErrorInfo.reason is the stable, machine-readable code; BadRequest lists bad fields).
func report(err error) int {
	st := status.Convert(err)
	fmt.Fprintf(os.Stderr, "error: %s: %s\n", st.Code(), st.Message())
	for _, detail := range st.Details() {
		switch d := detail.(type) {
		case *errdetails.ErrorInfo:
			fmt.Fprintf(os.Stderr, "reason: %s (%s)\n", d.GetReason(), d.GetDomain())
		case *errdetails.BadRequest:
			for _, v := range d.GetFieldViolations() {
				fmt.Fprintf(os.Stderr, "  %s: %s\n", v.GetField(), v.GetDescription())
			}
		}
	}
	return 3
}
